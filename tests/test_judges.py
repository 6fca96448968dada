import joblib
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from mogrpo.reward.judges import ToxicityJudge


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    """A toy judge in alt-profanity-check's file layout (vectorizer.joblib + model.joblib)."""
    folder = tmp_path_factory.mktemp("judge")
    texts = ["you idiot", "stupid moron", "shut up idiot", "thank you", "happy to help",
             "bake the bread"]
    labels = [1, 1, 1, 0, 0, 0]
    vec = TfidfVectorizer().fit(texts)
    clf = LogisticRegression(C=100.0).fit(vec.transform(texts), labels)
    joblib.dump(vec, folder / "vectorizer.joblib")
    joblib.dump(clf, folder / "model.joblib")
    return ToxicityJudge(folder, trusted=True)


def test_one_insult_in_a_long_civil_text_is_not_diluted(judge):
    civil = " ".join(["Thank you. Happy to help. Bake the bread."] * 10)
    insulting = civil + " You idiot."
    whole = judge.toxicity([civil, insulting])
    by_sentence = judge.max_sentence_toxicity([civil, insulting])
    # Whole-text scoring barely moves; the worst sentence ("You idiot.") dominates instead.
    assert by_sentence[1] > 0.8 and by_sentence[1] - by_sentence[0] > whole[1] - whole[0]
    assert judge.politeness([insulting])[0] == pytest.approx(1 - by_sentence[1])


def test_max_sentence_is_the_max_over_sentences(judge):
    text = "Thank you.\nYou idiot! Bake the bread?"
    parts = ["Thank you.", "You idiot!", "Bake the bread?"]
    assert judge.max_sentence_toxicity([text])[0] == pytest.approx(judge.toxicity(parts).max())
    assert judge.max_sentence_toxicity([]).shape == (0,)
    # politeness is 1 - the worst sentence's toxicity: the insult is rude, a neutral word is not
    pol = judge.politeness(["a", "you idiot"])
    assert pol.tolist() == \
        pytest.approx((1 - judge.max_sentence_toxicity(["a", "you idiot"])).tolist())
    assert pol[1] < 0.1 and pol[0] > 0.5


def test_missing_files_say_what_to_do(tmp_path):
    from mogrpo.reward.judges import ASSET_SHA256

    with pytest.raises(FileNotFoundError, match="mogrpo assets"):  # the default asset
        ToxicityJudge(tmp_path, sha256=ASSET_SHA256)
    # a folder the user named
    with pytest.raises(FileNotFoundError, match="point toxicity_model at a folder"):
        ToxicityJudge(tmp_path, trusted=True)
