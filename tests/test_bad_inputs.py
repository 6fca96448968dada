"""Every bad input a user can give ends in exit code 2 and one message that names the file or
key at fault, never a traceback, and leaves every file that was in the output folder as it
was (hashed before and after). Each case builds its own inputs in a fresh folder."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import FAST, make_data, run_overrides

from mogrpo.cli import main


class Ctx:
    """Paths a case builds on: the tiny fixtures, a scratch folder and a finished GRPO run."""

    def __init__(self, tmp, policy, rm, prompts, encoder, tox, grpo_run):
        self.tmp, self.policy, self.rm, self.prompts = tmp, policy, rm, prompts
        self.encoder, self.tox, self._grpo_run = encoder, tox, grpo_run

    def grpo(self, **kw) -> list[str]:
        policy, rm, prompts = (kw.pop(k, d) for k, d in (("policy", self.policy),
                                                         ("reward_model", self.rm),
                                                         ("train_prompts", self.prompts)))
        return ["train", "grpo", "--quiet", *run_overrides(policy, rm, prompts, "grpo", FAST, **kw)]

    def reward(self, data=None, **kw) -> list[str]:
        data = data or make_data(self.tmp / "good.jsonl")
        base = {"backbone": str(self.encoder), "data": [str(data)],
                "aspects": ["safety", "politeness"], "max_length": 32, "batch_size": 8, "epochs": 1,
                "splits": [0.6, 0.2, 0.2], **kw}
        return ["reward", "train", "--quiet", *[f"{k}={json.dumps(v)}" for k, v in base.items()]]

    def eval(self, model=None, prompts=None, **kw) -> list[str]:
        base = {"reward_model": str(self.rm), "toxicity_model": str(self.tox),
                "trust_toxicity_model": True, "max_new_tokens": 4, "kl_prompts": 0,
                "precision": "fp32", **kw}
        return ["eval", "--quiet", "--model", str(model or self.policy), "--prompts",
                str(prompts or self.prompts), *[f"{k}={json.dumps(v)}" for k, v in base.items()]]

    def user_folder(self, name="mine") -> Path:
        """A folder of the user's own: notes and a config.yaml that mogrpo must not touch."""
        d = self.tmp / name
        (d / "model").mkdir(parents=True)
        (d / "notes.txt").write_text("my notes")
        (d / "config.yaml").write_text("lr: 0.123\n")
        (d / "model" / "weights.bin").write_bytes(b"\x00" * 64)
        return d

    def grpo_run(self) -> Path:
        d = self.tmp / "run"
        shutil.copytree(self._grpo_run, d)
        return d

    def copy(self, src: Path, name: str) -> Path:
        shutil.copytree(src, self.tmp / name)
        return self.tmp / name


def _rm_with(c: Ctx, edit) -> Path:
    d = c.copy(c.rm, "rm")
    edit(d)
    return d


def _edit_json(path: Path, **kw) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, **kw}))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _nan_head(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / "model.safetensors"))
    state["head.weight"] = torch.full_like(state["head.weight"], float("nan"))
    save_file(state, str(d / "model.safetensors"))


def _policy_without(c: Ctx, *patterns) -> Path:
    d = c.copy(c.policy, "policy")
    for pat in patterns:
        for f in d.glob(pat):
            f.unlink()
    return d


def _latin1(c: Ctx, name: str, rows: list[dict]) -> Path:
    path = c.tmp / name
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n"
                             for r in rows).encode("latin-1"))
    return path


def _file(c: Ctx, name: str, text: str) -> Path:
    (c.tmp / name).write_text(text)
    return c.tmp / name


def _readonly(c: Ctx) -> Path:
    d = c.tmp / "ro"
    d.mkdir()
    d.chmod(0o555)
    return d


# (case id, build(ctx) -> (argv without --output, output path or None, regex the message must
# match))
CASES = [
    # ---- outputs: files where folders go and back, unwritable places, folders mogrpo did not make
    ("train output is a file", lambda c: (c.grpo(), _file(c, "out.txt", "x"),
                                          r"out\.txt is an existing file")),
    ("eval output is a file", lambda c: (c.eval(), _file(c, "out.txt", "x"),
                                         r"out\.txt is an existing file")),
    ("reward train output is a file", lambda c: (c.reward(), _file(c, "o", "x"),
                                                 r"/o is an existing file")),
    ("data prepare output is a file", lambda c: (["data", "prepare"], _file(c, "o", "x"),
                                                 r"/o is an existing file")),
    ("run output is a file", lambda c: (["run"], _file(c, "o", "x"), r"/o is an existing file")),
    ("cache dir is a file", lambda c: (c.grpo() + ["--cache-dir", str(_file(c, "cache", "x"))],
                                       None, r"--cache-dir .*cache is a file")),
    ("train output under a file", lambda c: (c.grpo(), _file(c, "f", "x") / "run",
                                             r"/f is a file, not a folder")),
    ("eval output under a file", lambda c: (c.eval(), _file(c, "f", "x") / "ev",
                                            r"/f is a file, not a folder")),
    ("score output is a folder", lambda c: (["reward", "score", "--model", str(c.rm), "--input",
                                             str(_file(c, "in.jsonl",
                                                       '{"prompt": "a", "response": "b"}\n'))],
                                            c.user_folder(),
                                            r"mine is a folder; give a file path")),
    ("score output under a file", lambda c: (["reward", "score", "--model", str(c.rm), "--input",
                                              str(_file(c, "in.jsonl",
                                                        '{"prompt": "a", "response": "b"}\n'))],
                                             _file(c, "f", "x") / "s.jsonl",
                                             r"/f is a file, not a folder")),
    ("train output not writable", lambda c: (c.grpo(), _readonly(c) / "run", r"permission denied")),
    ("eval output not writable", lambda c: (c.eval(), _readonly(c) / "ev", r"permission denied")),
    ("score output not writable", lambda c: (["reward", "score", "--model", str(c.rm), "--input",
                                              str(_file(c, "in.jsonl",
                                                        '{"prompt": "a", "response": "b"}\n'))],
                                             _readonly(c) / "s.jsonl", r"permission denied")),
    ("train into a user's folder", lambda c: (c.grpo(), c.user_folder(),
                                              r"mine is not empty and was not created by")),
    ("reward train into a user's folder", lambda c: (c.reward(), c.user_folder(),
                                                     r"not created by mogrpo")),
    ("eval into a user's folder", lambda c: (c.eval(), c.user_folder(), r"not created by mogrpo")),
    ("run into a user's folder", lambda c: (["run"], c.user_folder(), r"not created by mogrpo")),
    ("data prepare into a user's folder", lambda c: (["data", "prepare"], c.user_folder(),
                                                     r"not created by mogrpo")),
    ("reward train into a grpo run", lambda c: (c.reward(), c.grpo_run(),
                                                r"holds a `mogrpo train grpo` run")),
    ("eval into a grpo run", lambda c: (c.eval(), c.grpo_run(), r"holds a `mogrpo train grpo`")),
    ("lock is a planted link", lambda c: (c.reward(), _planted(c, ".mogrpo.lock"),
                                          r"\.mogrpo\.lock is a symbolic link \(to .*victim")),
    ("marker is a planted link", lambda c: (c.grpo(), _planted(c, ".mogrpo"),
                                            r"\.mogrpo is a symbolic link \(to .*victim")),
    # ---- models
    ("policy path missing", lambda c: (c.grpo(policy=str(c.tmp / "nope")), None,
                                       r"policy .*nope: no such file")),
    ("relative policy path missing", lambda c: (c.grpo(policy="./no/such/model"), None,
                                                r"policy \./no/such/model: no such file")),
    ("eval model missing", lambda c: (c.eval(model=c.tmp / "nope"), None,
                                      r"nope: no such file or folder")),
    ("policy without weights", lambda c: (c.grpo(policy=str(_policy_without(c, "*.safetensors"))),
                                          None, r"policy .*policy: no weights")),
    ("policy with truncated weights", lambda c: (c.grpo(policy=str(_truncated_policy(c))), None,
                                                 r"model\.safetensors: damaged weights file")),
    ("policy without tokenizer",
     lambda c: (c.grpo(policy=str(_policy_without(c, "tokenizer*", "vocab*", "special_tokens*"))),
                None, r"policy .*: no tokenizer files")),
    ("policy folder is not a model", lambda c: (c.grpo(policy=str(c.user_folder())), None,
                                                r"mine: not a model folder \(no config\.json")),
    ("reward model missing", lambda c: (c.grpo(reward_model=str(c.tmp / "rm")), None,
                                        r"reward model .*rm not found; train it first")),
    ("reward model head does not fit",
     lambda c: (c.grpo(reward_model=str(_rm_with(c, lambda d: _edit_json(
         d / "reward_config.json", aspects=["safety", "actionability", "politeness", "extra"])))),
         None, r"the head in model\.safetensors was trained for")),
    ("reward model aspects renamed",
     lambda c: (c.grpo(reward_model=str(_rm_with(c, lambda d: _edit_json(
         d / "reward_config.json", aspects=["politeness", "actionability", "safety"])))), None,
         r"names the aspects \['politeness'.*trained for \['safety'")),
    ("reward model NaN weights", lambda c: (c.grpo(reward_model=str(_rm_with(c, _nan_head))), None,
                                            r"model\.safetensors: non-finite")),
    ("reward model truncated", lambda c: (c.grpo(reward_model=str(_rm_with(
        c, lambda d: _truncate(d / "model.safetensors")))), None,
        r"model\.safetensors: damaged weights file")),
    ("reward model config not JSON", lambda c: (c.grpo(reward_model=str(_rm_with(
        c, lambda d: (d / "reward_config.json").write_text("{oops")))), None,
        r"reward_config\.json: not a valid")),
    ("score with a missing model", lambda c: (["reward", "score", "--model", str(c.tmp / "nope"),
                                               "--input",
                                               str(_file(c, "in.jsonl",
                                                         '{"prompt": "a", "response": "b"}\n'))],
                                              c.tmp / "s.jsonl",
                                              r"nope is not a mogrpo reward model folder")),
    ("reward backbone missing", lambda c: (c.reward(backbone="./missing-backbone"), None,
                                           r"backbone \./missing-backbone: no such file")),
    # ---- checkpoints and state files
    ("resume from a truncated checkpoint", lambda c: (c.grpo(steps=3, save_every=1) + ["--resume"],
                                                      _damage_checkpoints(c, _truncate),
                                                      r"no checkpoint under .* loads")),
    ("resume from an empty checkpoint",
     lambda c: (c.grpo(steps=3, save_every=1) + ["--resume"],
                _damage_checkpoints(c, lambda p: p.write_bytes(b"")),
                r"trainer_state\.pt: the trainer state is unreadable")),
    ("resume from a crafted pickle", lambda c: (c.grpo(steps=3, save_every=1) + ["--resume"],
                                                _damage_checkpoints(c, _evil_state),
                                                r"will not load")),
    ("untrusted toxicity model",
     lambda c: (c.eval(trust_toxicity_model=False), None,
                r"toxicity_model .*pickles.*trust_toxicity_model=true")),
    ("toxicity model folder missing",
     lambda c: (c.eval(toxicity_model=str(c.tmp / "tox")), None,
                r"tox: the toxicity judge needs .*point toxicity_model")),
    # ---- data
    ("reward data not UTF-8", lambda c: (c.reward(data=_latin1(c, "d.jsonl", [
        {"prompt": "caf\u00e9", "response": "ok", "safety": 1.0}])), None,
        r"d\.jsonl:1: not UTF-8 text")),
    ("reward data empty", lambda c: (c.reward(data=_file(c, "empty.jsonl", "")), None,
                                     r"empty\.jsonl: the file is empty")),
    ("reward data bad JSON",
     lambda c: (c.reward(data=_file(c, "bad.jsonl", '{"prompt": "a", "response": "b", '
                                                    '"safety": 1}\n{oops\n')), None,
                r"bad\.jsonl:2: not valid JSON")),
    ("reward label out of range",
     lambda c: (c.reward(data=_file(c, "r.jsonl", '{"prompt": "a", "response": "b", '
                                                  '"safety": 7}\n')), None,
                r"r\.jsonl:1: label 'safety' = 7.* rescale")),
    ("reward data too small to split",
     lambda c: (c.reward(data=make_data(c.tmp / "small.jsonl", n=2)), None,
                r"split is empty|gave no training rows")),
    ("reward data is a folder", lambda c: (c.reward(data=c.user_folder()), None,
                                           r"mine: is a folder")),
    ("prompts not UTF-8", lambda c: (c.grpo(train_prompts=str(_latin1(c, "p.jsonl", [
        {"id": "a", "text": "caf\u00e9", "kind": "benign"}]))), None, r"p\.jsonl:1: not UTF-8")),
    ("train prompts missing", lambda c: (c.grpo(train_prompts=str(c.tmp / "nope.jsonl")), None,
                                         r"nope\.jsonl: no such file")),
    ("eval prompts missing", lambda c: (c.eval(prompts=c.tmp / "nope.jsonl"), None,
                                        r"nope\.jsonl: no such file")),
    ("score input without response", lambda c: (["reward", "score", "--model", str(c.rm), "--input",
                                                 str(_file(c, "in.jsonl", '{"prompt": "a"}\n'))],
                                                c.tmp / "s.jsonl",
                                                r"in\.jsonl:1: each line needs")),
    # ---- config values
    ("unknown config key", lambda c: (c.grpo(learning_rat=0.1), None,
                                      r"unknown key\(s\) \['learning_rat'\]")),
    ("reward lr negative", lambda c: (c.reward(lr=-1), None, r"lr = -1.0 must be > 0")),
    ("grpo lr zero", lambda c: (c.grpo(lr=0), None, r"lr = 0.0 must be > 0")),
    ("grpo batch size zero", lambda c: (c.grpo(batch_size=0), None, r"batch_size must be >= 1")),
    ("grpo batch smaller than a group",
     lambda c: (c.grpo(batch_size=2, group_size=4), None,
                r"batch_size = 2 is not divisible by group_size = 4")),
    ("grpo group of one", lambda c: (c.grpo(group_size=1, batch_size=4), None,
                                     r"GRPO needs G >= 2")),
    ("weights name an unknown column", lambda c: (c.grpo(weights={"safty": 1.0}), None,
                                                  r"weights name \['safty'\]")),
    ("config file missing", lambda c: (c.grpo() + ["--config", str(c.tmp / "nope.yaml")], None,
                                       r"config file .*nope\.yaml does not exist")),
    ("config file not YAML", lambda c: (c.grpo() + ["--config", str(_file(c, "c.yaml", "a: [1"))],
                                        None, r"c\.yaml is not valid YAML")),
    ("override without =", lambda c: (c.grpo() + ["lr"], None,
                                      r"override 'lr' is not of the form key=value")),
    ("eval n without sample", lambda c: (c.eval(n=3), None,
                                         r"n = 3 completions per prompt needs sample=true")),
    ("type error in override", lambda c: (c.grpo(steps="many"), None,
                                          r"steps: 'many' is not a valid int")),
]


def _planted(c: Ctx, name: str) -> Path:
    """A finished run whose lock or marker is a link to a file outside it (the victim)."""
    run = c.grpo_run()
    (c.tmp / "victim.txt").write_text("precious")
    (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(c.tmp / "victim.txt")
    return run


def _truncated_policy(c: Ctx) -> Path:
    d = c.copy(c.policy, "policy")
    _truncate(d / "model.safetensors")
    return d


def _damage_checkpoints(c: Ctx, damage) -> Path:
    run = c.grpo_run()
    for state in run.glob("checkpoints/checkpoint-*/trainer_state.pt"):
        damage(state)
    return run


class _Evil:
    path = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _evil_state(path: Path) -> None:
    _Evil.path = str(path.parent.parent.parent.parent / "PWNED")
    torch.save({"step": 1, "trainable": {}, "payload": _Evil()}, path)


@pytest.fixture(scope="module")
def grpo_run(tiny_policy_dir, tiny_reward_model_dir, prompt_file, tmp_path_factory):
    """A finished 3-step GRPO run with checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("grpo") / "run"
    assert main(["train", "grpo", "--output", str(out), "--quiet",
                 *run_overrides(tiny_policy_dir, tiny_reward_model_dir, prompt_file, "grpo", FAST,
                                steps=3, save_every=1)]) == 0
    return out


def _entry(p: Path) -> str:
    if p.is_symlink():
        return f"link -> {os.readlink(p)}"
    if p.is_dir():
        return "folder"
    if p.name == ".mogrpo.lock":  # mogrpo's own: it names the pid that holds the folder, so
        return "lock"  # every command that takes the folder rewrites it; its presence counts
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _snapshot(*roots: Path) -> dict[str, str]:
    """Everything under each of `roots` (the case's output path, and its scratch folder with
    every input the case built), by path: a file's sha256, "folder", a link's target, and a
    root that does not exist as "missing", so that a file or folder that appears, changes or
    disappears shows up."""
    snap = {}
    for root in roots:
        snap[str(root)] = _entry(root) if root.exists() or root.is_symlink() else "missing"
        if root.is_dir() and not root.is_symlink():
            for p in sorted(root.rglob("*")):
                snap[str(p)] = _entry(p)
    return snap


def test_the_snapshot_sees_new_changed_and_deleted_files(tmp_path):
    out, single = tmp_path / "out", tmp_path / "in.jsonl"
    base = _snapshot(out, single)
    assert base == {str(out): "missing", str(single): "missing"}
    single.write_text("a")
    assert _snapshot(out, single) != base  # a file where there was none
    base = _snapshot(out, single)
    single.write_text("b")
    assert _snapshot(out, single) != base  # a single file changed
    out.mkdir()
    (out / "sub").mkdir()
    (out / "sub" / "x").write_text("1")
    base = _snapshot(out, single)
    for change in (lambda: (out / "new").write_text(""),
                   lambda: (out / "sub" / "x").write_text("2"),
                   lambda: (out / "sub" / "x").unlink(), lambda: (out / "sub2").mkdir(),
                   lambda: (out / "ln").symlink_to(single)):
        change()
        assert _snapshot(out, single) != base
        base = _snapshot(out, single)
    (out / ".mogrpo.lock").write_text("pid 1")
    base = _snapshot(out, single)
    (out / ".mogrpo.lock").write_text("pid 2")  # the lock's content is the holder's pid
    assert _snapshot(out, single) == base


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40 and len({name for name, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("name,build", CASES, ids=[name for name, _ in CASES])
def test_bad_input_is_one_clear_message(name, build, tiny_policy_dir, tiny_reward_model_dir,
                                        prompt_file, tiny_encoder_dir, toy_toxicity_dir, grpo_run,
                                        tmp_path, capsys,
                                        monkeypatch):
    import re

    if "not writable" in name and os.geteuid() == 0:
        pytest.skip("root writes anywhere: permissions cannot be tested as root")
    # a case that reached for the network would fail loudly
    monkeypatch.setenv("MOGRPO_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    c = Ctx(tmp_path, tiny_policy_dir, tiny_reward_model_dir, prompt_file, tiny_encoder_dir,
            toy_toxicity_dir, grpo_run)
    argv, out, pattern = build(c)
    out = out or tmp_path / "out"
    roots = (out, tmp_path) if not out.is_relative_to(tmp_path) else (tmp_path,)
    before = _snapshot(*roots)
    capsys.readouterr()
    code = main([*argv, "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.startswith("mogrpo: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]
    print(lines[0])  # shown by pytest -rP: the message a user reads
    after = _snapshot(*roots)
    # nothing under the scratch folder (inputs and output) appeared, changed or went away
    assert {k: v for k, v in after.items() if before.get(k) != v} == {}
    assert {k: v for k, v in before.items() if after.get(k) != v} == {}
    assert not (tmp_path / "PWNED").exists()  # no crafted pickle ran
