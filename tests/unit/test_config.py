"""Structured config (ln_ray/config.py): every shipped YAML loads, overrides apply, mistakes fail
clearly."""

from __future__ import annotations

import functools
import json
import re

import pytest
import yaml

from ln_ray.cli import finished_run_config, main
from ln_ray.config import (
    CONF_DIR,
    ConfigError,
    InputConfig,
    LnRayConfig,
    load_config,
    to_dict,
)
from ln_ray.io.storage import redacted
from tests.helpers import REPO


@pytest.mark.parametrize("path", sorted(CONF_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path.stem)
    assert cfg.input.path and cfg.output.path and cfg.student.model
    assert path.read_text().startswith("#")  # each YAML opens with how to run it


@pytest.mark.parametrize("path", sorted(CONF_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_set_only_what_differs_from_the_defaults(path):
    """Each default has one home, its dataclass: a YAML repeating one would hide a change to it."""
    defaults = to_dict(LnRayConfig())

    def leaves(tree, prefix=()):
        for key, value in tree.items():
            if isinstance(value, dict) and value:
                yield from leaves(value, (*prefix, key))
            else:
                yield (*prefix, key), value

    for key, value in leaves(yaml.safe_load(path.read_text()) or {}):
        default = functools.reduce(lambda node, part: node[part], key, defaults)
        assert value != default, f"{path.name} repeats the default {'.'.join(key)}: {value!r}"


def test_the_readmes_settings_table_shows_the_defaults_the_code_has():
    defaults = to_dict(LnRayConfig())
    rows = re.findall(r"^\| `([a-z_.]+)` \| `([^`|]*)` \|", (REPO / "README.md").read_text(), re.M)
    assert len(rows) >= 25
    for key, shown in rows:
        value = functools.reduce(lambda node, part: node[part], key.split("."), defaults)
        assert yaml.safe_load(shown) == value, f"README shows {key} = {shown}, the code {value!r}"


def test_config_command_prints_every_setting_as_a_file_that_loads_back(tmp_path, capsys):
    overrides = [
        "input.path=s3://KEY:SECRET@bucket/traces/",
        "student.reasoning_close=</think>\n",  # a line break: printed in double quotes
        "scoring.window=2",
    ]
    assert main(["config", "--config-name", "cluster", *overrides]) == 0
    printed = capsys.readouterr().out
    assert "SECRET" not in printed and "s3://***@bucket/traces/" in printed
    written = tmp_path / "run.yaml"
    written.write_text(printed)
    expected = load_config("cluster", overrides)
    got = load_config(str(written), ["input.path=s3://KEY:SECRET@bucket/traces/"])
    assert to_dict(got) == to_dict(expected)
    assert got.student.reasoning_close == "</think>\n"
    assert main(["config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == to_dict(LnRayConfig())


def test_defaults_run_on_two_cpus_without_a_gpu():
    cfg = load_config("default")
    assert cfg.compute.gpus_per_actor == 0
    # one actor must leave CPU for the read and prepare tasks, or Ray Data stalls
    assert cfg.compute.actors * cfg.compute.cpus_per_actor + cfg.compute.prepare_cpus <= 2


def test_dotlist_overrides():
    cfg = load_config("default", ["scoring.window=2", "input.columns.prompt=question"])
    assert cfg.scoring.window == 2
    assert cfg.input.columns.prompt == "question"


def test_string_overrides_keep_the_text_as_typed():
    cfg = load_config(
        "default",
        [
            "input.columns.teacher=yes",  # YAML would read true, then 'True'
            "input.columns.prompt_id=007",  # and 7
            "input.columns.response=1e3",
            "student.chat_template=null",  # null still unsets an optional string
            "selection.require_correct=no",  # a boolean key still reads YAML
            "student.template_kwargs.enable_thinking=false",
        ],
    )
    columns = cfg.input.columns
    assert (columns.teacher, columns.prompt_id, columns.response) == ("yes", "007", "1e3")
    assert cfg.student.chat_template is None and cfg.selection.require_correct is False
    assert cfg.student.template_kwargs == {"enable_thinking": False}


def test_global_cap_defaults_to_the_students_context():
    assert load_config("default").scoring.max_tokens is None
    assert load_config("default", ["scoring.max_tokens=2048"]).scoring.max_tokens == 2048


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="scoring.windw"):
        load_config("default", ["scoring.windw=3"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("scoring.window=abc", "scoring.window"),
        ("scoring.window=-1", "scoring.window must be >= 0"),
        ("scoring.window_fraction=1.5", "window_fraction"),
        ("segment.mode=words", "segment.mode must be one of"),
        ("input.format=csv", "input.format must be one of"),
        ("compute.actors=0", "compute.actors must be >= 1"),
        ("compute.shuffle=random", "compute.shuffle must be one of"),
        ("compute.head_chunk=-1", "compute.head_chunk must be >= 0"),
        ("compute.min_gpus=-1", "compute.min_gpus must be >= 0"),
        ("compute.wait_for_cluster_s=0", "compute.wait_for_cluster_s must be > 0"),
        ("scoring.max_tokens=0", "scoring.max_tokens must be >= 1 or null"),
        ("selection.seed=-1", "selection.seed must be >= 0"),
        ("selection.curate_by=avg_rank", "selection.curate_by must be one of"),
        ("scoring.ifd=false selection.curate_by=ifd_ppl", "curate_by=ifd_ppl needs scoring.ifd"),
        ("input.layout=per_row", "input.layout must be one of"),
        ("scoring.ifd=maybe", "scoring.ifd"),
        ("scoring.window=[1", "bad override value"),
    ],
)
def test_bad_values_fail_before_any_work(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("default", override.split(" "))


def test_unknown_config_name():
    with pytest.raises(ConfigError, match="no config named 'nope'"):
        load_config("nope")


def test_a_finished_runs_config_comes_back_as_stored(tmp_path):
    template = "{% for m in messages %}<|im_start|>{{ m['content'] | trim }}\n{% endfor %}"
    cfg = load_config(
        "default",
        ["input.path=s3://KEY:SECRET@bucket/in/", "scoring.window=2"],
    )
    cfg.student.chat_template = template
    cfg.input.columns.teacher = "yes"
    cfg.input.columns.prompt = "# q"
    stored = json.loads(json.dumps(redacted(to_dict(cfg))))  # as the manifest holds it
    again = finished_run_config(stored, str(tmp_path), ["selection.require_correct=false"])
    assert again.student.chat_template == template
    assert (again.input.columns.teacher, again.input.columns.prompt) == ("yes", "# q")
    assert again.scoring.window == 2 and again.selection.require_correct is False
    assert again.output.path == str(tmp_path)
    assert again.input.path == InputConfig().path  # the redacted URL is not brought back


def test_commands_on_a_folder_without_a_run_say_so(tmp_path, capsys):
    for command in ("summary", "select", "report"):  # one check, outputs.published_manifest
        assert main([command, str(tmp_path / "nothing")]) == 2
        assert "manifest.json is missing" in capsys.readouterr().err
