"""Config errors: one line per problem, each naming the file, the key and what is allowed."""

import textwrap

import pytest

from dataflywheel.errors import UserError
from dataflywheel.pipelines.config import JobConfig, load_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(text))
    return path


GOOD = """
input: {paths: data/*.jsonl, kind: conversation}
stages:
  - stage: length
    min_words: 3
  - stage: exact_dedup
output: {path: out}
"""


def error(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as err:
        load_config(path)
    msg = str(err.value)
    assert all(line.startswith(f"{path}") for line in msg.splitlines()), msg
    return msg


def test_single_job_form_parses(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.runner.engine == "local" and len(cfg.jobs) == 1
    stages = cfg.jobs[0].build_stages()
    assert [s.name for s in stages] == ["length", "exact_dedup"] and stages[0].config.min_words == 3


def test_unknown_stage_lists_allowed(tmp_path):
    msg = error(tmp_path, GOOD.replace("stage: length", "stage: lenght"))
    assert "stages[0].stage" in msg and "unknown stage 'lenght'" in msg and "exact_dedup" in msg


def test_unknown_stage_key_lists_allowed(tmp_path):
    msg = error(tmp_path, GOOD.replace("min_words: 3", "min_wrds: 3"))
    assert "stages[0].min_wrds: unknown key; allowed:" in msg and "min_words" in msg


def test_bad_value_shows_value(tmp_path):
    msg = error(tmp_path, GOOD.replace("min_words: 3", "min_words: lots"))
    assert "stages[0].min_words" in msg and "'lots'" in msg


def test_bad_top_level_key_and_enum(tmp_path):
    assert "outptu: unknown key; allowed:" in error(tmp_path, GOOD + "outptu: {}\n")
    msg = error(tmp_path, GOOD.replace("kind: conversation", "kind: chat"))
    assert "input.kind" in msg and "'chat'" in msg


def test_runner_sections_checked(tmp_path):
    msg = error(tmp_path, GOOD + "runner: {engine: dataflow}\n")
    assert "runner" in msg and "dataflow" in msg
    msg = error(tmp_path, GOOD + "runner: {engine: dataflow, dataflow: {project: p, temp_location: /tmp/x}}\n")
    assert "gs://" in msg
    msg = error(tmp_path, GOOD + "runner: {engine: local, dataflow: {projct: p}}\n")
    assert "runner.dataflow.projct: unknown key" in msg and "project" in msg


def test_yaml_syntax_and_missing_file(tmp_path):
    assert ":3: invalid YAML" in error(tmp_path, "input:\n  paths: [a\n  kind: x\n")
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_env_expansion(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT_DIR", "/tmp/o")
    cfg = load_config(write(tmp_path, GOOD.replace("path: out", "path: '${OUT_DIR}'")))
    assert cfg.jobs[0].output.path == "/tmp/o"
    assert "NOPE_VAR is not set" in error(tmp_path, GOOD.replace("path: out", "path: '${NOPE_VAR}'"))


def test_stage_by_import_path(tmp_path):
    cfg = load_config(write(tmp_path, GOOD.replace("stage: length", "stage: dataflywheel.filters.basic:Length")))
    assert cfg.jobs[0].build_stages()[0].config.min_words == 3
    assert "cannot import stage" in error(tmp_path, GOOD.replace("stage: length", "stage: nope.mod:X"))


def test_shipped_configs_validate():
    for name in ("demo.yaml",):
        assert load_config(f"configs/{name}").jobs


def test_secrets_are_masked_in_reports():
    from dataflywheel.stats import redact

    cfg = {"hub": {"hf_token": "hf_abc", "repo": "me/data"}, "judges": [{"api_key": "sk-1", "model": "m"}], "password": ""}
    assert redact(cfg) == {"hub": {"hf_token": "***", "repo": "me/data"}, "judges": [{"api_key": "***", "model": "m"}],
                           "password": ""}


def test_every_problem_is_reported_one_line_each(tmp_path):
    text = GOOD.replace("min_words: 3", "min_words: lots\n    max_wrds: 2").replace("kind: conversation", "kind: chat")
    lines = error(tmp_path, text).splitlines()
    assert len(lines) == 3, lines
    assert any("stages[0].max_wrds: unknown key; allowed:" in x and "max_words" in x for x in lines)
    assert any("stages[0].min_words" in x and "'lots'" in x for x in lines)
    assert any("input.kind" in x and "'chat'" in x for x in lines)


def test_single_job_file_is_not_described_as_jobs_0(tmp_path):
    msg = error(tmp_path, GOOD.replace("min_words: 3", "min_words: lots"))
    assert "jobs" not in msg and "stages[0].min_words" in msg
    multi = "jobs:\n  - name: a\n" + textwrap.indent(GOOD.replace("min_words: 3", "min_words: lots"), "    ")
    assert "jobs[0].stages[0].min_words" in error(tmp_path, multi)


def test_job_config_built_in_code_validates_its_stages():
    """However a JobConfig is made, its stages are validated specs: no way to run zero stages silently."""
    job = JobConfig(input={"paths": ["x"]}, output={"path": "o"},
                    stages=[{"stage": "length", "min_words": 2}, {"stage": "exact_dedup"}])
    assert [type(s).__name__ for s in job.build_stages()] == ["Length", "ExactDedup"]
    assert job.build_stages()[0].config.min_words == 2
    with pytest.raises(ValueError, match="min_wrds"):
        JobConfig(input={"paths": ["x"]}, output={"path": "o"}, stages=[{"stage": "length", "min_wrds": 2}])
    copy = JobConfig.model_validate(job.model_dump())
    assert copy.stages == job.stages
