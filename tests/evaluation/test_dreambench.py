import logging

import pytest

from hyperbooth.errors import ConfigError, ImageLoadError
from hyperbooth.evaluation.backends import world_context, world_prompts
from hyperbooth.evaluation.dreambench import EvalPrompt, load_subject, load_subjects, parse_prompts_file
from hyperbooth.world.contexts import Context
from tests.evaluation.conftest import DREAMBENCH, PROMPTS_FILE, needs_dreambench


@needs_dreambench
def test_parses_the_real_prompts_file():
    ps = parse_prompts_file(PROMPTS_FILE)
    assert len(ps.classes) == 30
    assert len(ps.object_prompts) == 25 and len(ps.live_prompts) == 25
    assert ps.classes["bear_plushie"] == "stuffed animal" and ps.classes["backpack_dog"] == "backpack"
    assert sum(ps.kind_of(n) == "live" for n in ps.classes) == 9  # DreamBench: 9 live subjects (dogs, cats)
    assert ps.kind_of("dog3") == "live" and ps.kind_of("teapot") == "object"
    first = ps.object_prompts[0]
    assert first.personalized("sks", "backpack") == "a sks backpack in the jungle"
    assert ps.prompts("live")[13].class_prompt("dog") == "a dog wearing a black top hat and a monocle"
    assert ps.object_prompts[24].class_prompt("vase") == "a cube shaped vase"
    # the world keeps the prompts it can show: 12 backgrounds, 2 recolours (object list) + the red hat (live list)
    kept = world_prompts(ps)
    assert len(kept) == 15 and {p.template for p in kept} == {p.template for p in world_prompts()}


@pytest.mark.parametrize("text, why", [
    ("a sks dog in the jungle\na sks dog on the beach\n", "unexpected line"),
    ('{"prompts": ["a {0} {1}"]}', "unexpected line"),
    ("Classes\n\nsubject_name,class\ndog,dog\n\nObject Prompts\n\nprompt_list = [\n'a {0} {1} x'.format(unique_token, class_token),\n]\n", "Live Subject Prompts"),
    ("Classes\nsubject_name,class\ndog,dog\nObject Prompts\nprompt_list = [\n'a {1} x'.format(unique_token, class_token),\n]\n", r"\{0\} and \{1\} once"),
    ("Classes\nsubject_name,class\ndog,dog\nObject Prompts\nprompt_list = [\n'a {0} {1} x'.format(unique_token, class_token),\n", "not closed"),
])
def test_prompts_file_of_another_layout_is_named(tmp_path, text, why):
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    with pytest.raises(ConfigError, match=why) as e:
        parse_prompts_file(path)
    assert str(path) in str(e.value)


def test_missing_prompts_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.txt"):
        parse_prompts_file(tmp_path / "nope.txt")


@needs_dreambench
def test_loads_a_real_subject_folder():
    subject = load_subject(DREAMBENCH / "dog", "dog", size=48)
    assert subject.name == "dog" and subject.kind == "live" and subject.images.shape == (5, 3, 48, 48)
    assert subject.images.min() >= -1 and subject.images.max() <= 1


def test_empty_subject_folder_is_named(tmp_path):
    (tmp_path / "teapot").mkdir()
    with pytest.raises(ImageLoadError, match="teapot.*holds no images"):
        load_subject(tmp_path / "teapot", "teapot")


def test_non_image_is_skipped_with_a_warning_and_error_if_nothing_is_left(tmp_path, caplog):
    from PIL import Image

    folder = tmp_path / "vase"
    folder.mkdir()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(folder / "00.png")
    (folder / "notes.txt").write_text("not a photo")
    with caplog.at_level(logging.WARNING):
        subject = load_subject(folder, "vase", size=16)
    assert subject.images.shape == (1, 3, 16, 16) and subject.skipped == (str(folder / "notes.txt"),)
    assert "notes.txt" in caplog.text
    (folder / "00.png").unlink()
    with pytest.raises(ImageLoadError, match=r"vase.*no readable images.*notes\.txt"):
        load_subject(folder, "vase")


@needs_dreambench
def test_unknown_subject_name_is_named(tmp_path):
    ps = parse_prompts_file(PROMPTS_FILE)
    with pytest.raises(ConfigError, match="'dragon'"):
        load_subjects(DREAMBENCH, ps, names=["dragon"])
    with pytest.raises(ImageLoadError, match="backpack"):  # in the table, but no folder
        load_subjects(tmp_path, ps, names=["backpack"])


def test_world_contexts_of_dreambench_prompts():
    assert world_context(EvalPrompt("a {0} {1} in the snow")) == Context(background="snow")
    assert world_context(EvalPrompt("a purple {0} {1}")) == Context(recolor="purple")
    assert world_context(EvalPrompt("a {0} {1} wearing a red hat")) == Context(accessory="red_hat")
    assert world_context(EvalPrompt("a shiny {0} {1}")) is None
    assert world_context(EvalPrompt("a {0} {1} in a chef outfit")) is None
