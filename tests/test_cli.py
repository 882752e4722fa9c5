"""The `catalog` command line: options in, one library call, lines and exit codes out.

Most tests patch the library function the command calls and assert what it was given and
what was printed; taxonomy, sample-data and demo run the real library (they are quick).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from typer.testing import CliRunner

from catalog_gen.train.adapters import read_adapter
from catalog_gen.cli.main import EXIT_BAD_INPUT, EXIT_PARTIAL, app
from catalog_gen.config import TrainConfig, build_config, read_recipe
from catalog_gen.errors import CatalogError
from catalog_gen.train.workflow import PhotoSource, TrainOutcome, TrainSummary

runner = CliRunner()


class FakeTrainClass:
    """Stands in for catalog_gen.train.workflow.train_class: records its call, returns a set summary."""

    def __init__(self, summary: TrainSummary | None = None, error: Exception | None = None):
        self.summary = summary or TrainSummary()
        self.error = error
        self.calls: list[dict] = []

    def __call__(self, source, class_key, instance_keys, workdir, config, **kwargs):
        self.calls.append(dict(source=source, class_key=class_key, instance_keys=instance_keys, workdir=workdir,
                               config=config, **kwargs))
        if self.error is not None:
            raise self.error
        return self.summary

    @property
    def config(self) -> TrainConfig:
        (call,) = self.calls
        return call["config"]


@pytest.fixture
def fake_train(monkeypatch):
    """Patch train_class where `catalog train` imports it from (at call time)."""

    def install(**kwargs) -> FakeTrainClass:
        fake = FakeTrainClass(**kwargs)
        monkeypatch.setattr("catalog_gen.train.workflow.train_class", fake)
        return fake

    return install


def _source_args(catalogue) -> list[str]:
    return ["--photos", str(catalogue.photos_dir), "--products", str(catalogue.products_csv)]


def _train(catalogue, *options: str):
    return runner.invoke(app, ["train", "--class", "ring", *_source_args(catalogue), *options])


def _write_recipe(path: Path, **values) -> Path:
    lines = ["[train]"] + [f"{key} = {_toml(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


# ---------------------------------------------------------------- train: options -> config


def test_train_merges_builtin_recipe_under_command_line(fake_train, sample_catalogue, tmp_path):
    fake = fake_train()
    result = _train(sample_catalogue, "--recipe", "tiny_demo", "--steps", "7", "--instance", "band",
                    "--instance", "signet", "--workdir", str(tmp_path / "work"))

    assert result.exit_code == 0, result.output
    config = fake.config
    assert config.steps == 7  # command line
    assert config.resolution == 64 and config.learning_rate == 1e-3 and config.optimizer == "adamw"  # recipe
    assert config.checkpoint_every == 20 and config.validation_steps == 4  # recipe
    assert config == build_config(TrainConfig, read_recipe("tiny_demo", "train"), {"steps": 7})
    call = fake.calls[0]
    assert call["class_key"] == "ring"
    assert call["instance_keys"] == ["band", "signet"]
    assert call["workdir"] == tmp_path / "work"
    assert call["source"] == PhotoSource(sample_catalogue.photos_dir, sample_catalogue.products_csv, "jewelry")
    assert call["resume"] is False and call["force"] is False
    assert callable(call["progress"])
    assert "0 trained, 0 already trained, 0 failed" in result.stdout


def test_train_recipe_file_and_every_option(fake_train, sample_catalogue, tmp_path):
    recipe = _write_recipe(tmp_path / "mine.toml", base_model="tiny", resolution=64, steps=11, lora_rank=2,
                           optimizer="adamw", checkpoint_every=5, seed=3)
    fake = fake_train()
    result = _train(sample_catalogue, "--recipe", str(recipe), "--lora-rank", "8", "--learning-rate", "0.002",
                    "--seed", "9", "--resolution", "128", "--mixed-precision", "bf16", "--prior-preservation",
                    "--resume", "--force")

    assert result.exit_code == 0, result.output
    config = fake.config
    assert (config.lora_rank, config.learning_rate, config.seed, config.resolution) == (8, 0.002, 9, 128)
    assert config.mixed_precision == "bf16" and config.prior_preservation is True
    assert (config.steps, config.checkpoint_every, config.optimizer) == (11, 5, "adamw")  # from the file
    assert config.validation_images == TrainConfig.validation_images  # neither: the default
    assert fake.calls[0]["resume"] is True and fake.calls[0]["force"] is True
    assert fake.calls[0]["instance_keys"] == []  # no --instance: every instance of the class
    assert fake.calls[0]["workdir"] == Path("catalog-work")


def test_train_method_option_reaches_the_config(fake_train, sample_catalogue):
    fake = fake_train()
    result = _train(sample_catalogue, "--method", "pivotal", "--token", "band=<my-band>")
    assert result.exit_code == 0, result.output
    assert fake.config.method == "pivotal" and fake.calls[0]["chosen_tokens"] == {"band": "<my-band>"}


def test_train_without_recipe_uses_config_defaults(fake_train, sample_catalogue):
    fake = fake_train()
    result = _train(sample_catalogue, "--steps", "3")
    assert result.exit_code == 0, result.output
    assert fake.config == TrainConfig(steps=3)


def test_train_prints_each_outcome(fake_train, sample_catalogue, tmp_path):
    adapter_dir = tmp_path / "adapters" / "ring" / "band"
    fake_train(summary=TrainSummary(outcomes=[
        TrainOutcome("ring/band", "trained", adapter_dir=adapter_dir, steps=7, seconds=1.5),
        TrainOutcome("ring/signet", "already trained", adapter_dir=tmp_path / "s", steps=7),
    ]))
    result = _train(sample_catalogue, "--steps", "7")
    assert result.exit_code == 0, result.output
    assert f"ring/band (7 steps, 1.5s) -> {adapter_dir}" in result.stdout
    assert "already trained" in result.stdout and "ring/signet" in result.stdout
    assert "1 trained, 1 already trained, 0 failed" in result.stdout


# ---------------------------------------------------------------- train: errors and exit codes


def test_failed_instance_exits_3_after_printing_the_summary(fake_train, sample_catalogue):
    fake_train(summary=TrainSummary(outcomes=[
        TrainOutcome("ring/band", "trained", adapter_dir=Path("a"), steps=2),
        TrainOutcome("ring/signet", "failed", "loss became nan at step 3"),
    ]))
    result = _train(sample_catalogue)
    assert result.exit_code == EXIT_PARTIAL == 3
    assert "ring/signet: loss became nan at step 3" in result.stdout
    assert "1 trained, 0 already trained, 1 failed" in result.stdout


def test_library_error_exits_2_with_its_message(fake_train, sample_catalogue):
    fake = fake_train(error=CatalogError("unknown class 'bracelet'; known: hoops, necklace, ring, studs"))
    result = _train(sample_catalogue)
    assert result.exit_code == EXIT_BAD_INPUT == 2
    assert result.stderr.strip() == "error: unknown class 'bracelet'; known: hoops, necklace, ring, studs"
    assert "Traceback" not in result.output
    assert len(fake.calls) == 1


@pytest.mark.parametrize(("options", "message"), [
    (["--optimizer", "sgd"], "optimizer must be one of auto, adamw8bit, adamw, prodigy; got 'sgd'"),
    (["--steps", "0"], "steps must be > 0, got 0"),
    (["--mixed-precision", "fp32"], "mixed_precision must be one of auto, no, fp16, bf16; got 'fp32'"),
    (["--resolution", "100"], "resolution must be a multiple of 8"),
    (["--learning-rate", "-1"], "learning_rate must be > 0, got -1.0"),
    (["--method", "lora"], "method must be one of dreambooth-lora, textual-inversion, pivotal, dreambooth, "
                           "lora-captions, two-stage; got 'lora'"),
])
def test_bad_option_values_name_the_setting_and_never_train(fake_train, sample_catalogue, options, message):
    fake = fake_train()
    result = _train(sample_catalogue, *options)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert fake.calls == []


def test_bad_recipe_is_a_clear_error(fake_train, sample_catalogue, tmp_path):
    fake = fake_train()
    result = _train(sample_catalogue, "--recipe", "no_such_recipe")
    assert result.exit_code == 2
    assert "recipe 'no_such_recipe' not found" in result.stderr

    recipe = _write_recipe(tmp_path / "typo.toml", stepz=5)
    result = _train(sample_catalogue, "--recipe", str(recipe))
    assert result.exit_code == 2
    assert f"recipe {recipe}: unknown setting(s) stepz" in result.stderr

    recipe = _write_recipe(tmp_path / "type.toml", steps="many")
    result = _train(sample_catalogue, "--recipe", str(recipe))
    assert result.exit_code == 2
    assert "steps must be int, got 'many'" in result.stderr
    assert fake.calls == []


def test_missing_photo_source_is_a_clear_error(fake_train, tmp_path):
    fake = fake_train()
    result = runner.invoke(app, ["train", "--class", "ring"])
    assert result.exit_code == 2
    assert "error: give a photo source" in result.stderr

    result = runner.invoke(app, ["train", "--class", "ring", "--photos", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert f"photo folder {tmp_path / 'nowhere'} does not exist" in result.stderr
    assert fake.calls == []


def test_option_of_the_wrong_type_is_refused_by_the_parser(fake_train, sample_catalogue):
    fake = fake_train()
    result = _train(sample_catalogue, "--steps", "many")
    assert result.exit_code == 2
    assert "Invalid value for '--steps'" in result.output
    assert fake.calls == []


# ---------------------------------------------------------------- taxonomy, sample-data, demo (real library)


def test_taxonomy_prints_the_table_for_the_sample_catalogue(sample_catalogue):
    result = runner.invoke(app, ["taxonomy", *_source_args(sample_catalogue)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("class map 'jewelry'")
    assert lines[1].split() == ["class", "instance", "photos", "status"]
    rows = {(line.split()[0], line.split()[1]) for line in lines[2:] if not line.startswith(" ")}
    for key in [("ring", "band"), ("ring", "signet"), ("hoops", "beaded"), ("necklace", "pendant"), ("studs", "studs")]:
        assert key in rows, f"{key} missing from:\n{result.stdout}"


def test_taxonomy_unknown_class_map_exits_2(sample_catalogue):
    result = runner.invoke(app, ["taxonomy", *_source_args(sample_catalogue), "--class-map", "no_such_map"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and "no_such_map" in result.stderr


@pytest.mark.slow  # builds or loads models
def test_sample_data_writes_the_catalogue(tmp_path):
    out = tmp_path / "catalogue"
    result = runner.invoke(app, ["sample-data", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "products.csv").is_file() and (out / "skus.csv").is_file()
    assert any((out / "photos").rglob("*.jpg"))
    assert f"wrote sample catalogue to {out}" in result.stdout
    assert f"products: {out / 'products.csv'}" in result.stdout
    assert "odd file" in result.stdout


@pytest.fixture
def one_torch_thread():
    """Real training runs on one intra-op thread: on this shared 2-core machine two spinning
    OpenMP threads made the demo's steps up to 50x slower (0.3 s vs 11 s per instance)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_few_steps(tmp_path, tiny_model, one_torch_thread):
    workdir = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--workdir", str(workdir), "--steps", "2", "--inference-steps", "4"])
    assert result.exit_code == 0, result.output

    adapters = workdir / "adapters" / "ring"
    trained = sorted(p.name for p in adapters.iterdir() if not p.name.startswith("."))
    assert trained == ["band", "bold", "dome", "signet", "slim", "stacker"]
    for instance in trained:
        info = read_adapter(adapters / instance)
        assert info.diffusers_file.is_file() and info.kohya_file.is_file()
        assert info.record["steps"] == 2 and info.record["recipe"]["resolution"] == 64
        assert f"ring/{instance}" in result.stdout
    assert "(2 steps per instance; " in result.stdout
    assert f"done: adapters in {adapters}" in result.stdout
    assert (workdir / "tokens.json").is_file() and (workdir / "sample" / "products.csv").is_file()
    manifest = workdir / "runs" / "demo" / "manifest.parquet"
    assert manifest.is_file() and "5. nightly generation" in result.stdout
    import json

    assert json.loads((manifest.parent / "run.json").read_text())["settings"]["generate"]["inference_steps"] == 4
    assert "sheet rows rejected (rejects.csv)" in result.stdout
    report = workdir / "runs" / "demo" / "report" / "index.html"
    assert report.is_file() and f"-> {report}" in result.stdout and "catalog review" in result.stdout
    import polars as pl

    skus_in_run = pl.read_parquet(manifest)["sku"].n_unique()
    assert skus_in_run > 0 and report.read_text().count('<article class="card"') == skus_in_run


@pytest.fixture
def fake_generate(monkeypatch):
    """Patch the generator where the command imports it; record what it was given."""
    from catalog_gen.generate import generation

    calls = []

    def fake(request, config, **kwargs):
        calls.append((request, config))
        summary = generation.GenerationSummary(request.run_dir, skus_total=2, skus_done=2, candidates=4, passed=3,
                                               kept=3)
        if request.skus.name == "broken.csv":
            summary.errors.append(("SKU-9", "adapter ring/band: bad file"))
        return summary

    monkeypatch.setattr(generation, "generate", fake)
    return calls


def test_generate_merges_recipe_and_templates_under_options(fake_generate, tmp_path):
    result = runner.invoke(app, ["generate", "--skus", str(tmp_path / "skus.csv"), "--workdir", str(tmp_path),
                                 "--run-dir", str(tmp_path / "run"), "--recipe", "tiny_nightly", "--inference-steps", "3"])
    assert result.exit_code == 0, result.output
    request, config = fake_generate[0]
    assert config.inference_steps == 3 and config.clip_model == "tiny-clip" and config.resolution == 64
    assert request.run_dir == tmp_path / "run" and "ring" in request.templates
    assert "candidates: 4, passed the gates: 3, kept: 3" in result.stdout


def test_generate_default_run_folder_is_named_after_the_sheet(fake_generate, tmp_path):
    result = runner.invoke(app, ["generate", "--skus", str(tmp_path / "nightly.csv"), "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    request, _ = fake_generate[0]
    assert request.run_dir.parent == tmp_path / "runs" and request.run_dir.name.startswith("nightly-")


def test_generate_with_sku_errors_exits_3(fake_generate, tmp_path):
    result = runner.invoke(app, ["generate", "--skus", str(tmp_path / "broken.csv"), "--workdir", str(tmp_path)])
    assert result.exit_code == EXIT_PARTIAL
    assert "error SKU-9: adapter ring/band: bad file" in result.stdout


def test_generate_bad_setting_is_refused_before_running(fake_generate, tmp_path):
    result = runner.invoke(app, ["generate", "--skus", str(tmp_path / "s.csv"), "--scheduler", "heun9"])
    assert result.exit_code == EXIT_BAD_INPUT and "scheduler" in result.output
    assert fake_generate == []


def test_eval_passes_the_inception_extractor_and_weights_file(monkeypatch, tmp_path):
    from catalog_gen.evaluate import evaluation

    seen = []

    def fake_run_eval(workdir, class_key, instances, config, class_map, progress=None):
        seen.append(config)
        out = tmp_path / "out"
        out.mkdir(exist_ok=True)
        (out / "summary.md").write_text("summary")
        return out

    monkeypatch.setattr(evaluation, "run_eval", fake_run_eval)
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    result = runner.invoke(app, ["eval", "--class", "ring", "--workdir", str(tmp_path / "work"),
                                 "--extractor", "inception", "--inception-weights", str(weights)])
    assert result.exit_code == 0, result.output
    assert seen[0].extractor == "inception" and seen[0].inception_weights == str(weights)

    result = runner.invoke(app, ["eval", "--class", "ring", "--extractor", "resnet"])
    assert result.exit_code == 2 and "extractor" in result.stderr and "inception" in result.stderr


def test_generate_allow_base_mismatch_reaches_the_config(fake_generate, tmp_path):
    args = ["generate", "--skus", str(tmp_path / "s.csv"), "--workdir", str(tmp_path)]
    assert runner.invoke(app, args).exit_code == 0
    assert runner.invoke(app, args + ["--allow-base-mismatch"]).exit_code == 0
    assert [config.allow_base_mismatch for _, config in fake_generate] == [False, True]


def test_generate_redo_folder_is_named_after_the_reviewed_run(fake_generate, tmp_path):
    result = runner.invoke(app, ["generate", "--skus", str(tmp_path / "nightly.csv"), "--workdir", str(tmp_path),
                                 "--redo-rejected", str(tmp_path / "runs" / "nightly-20261130")])
    assert result.exit_code == 0, result.output
    request, _ = fake_generate[0]
    assert request.run_dir.name.endswith("-redo-nightly-20261130")
    assert request.redo_rejected == tmp_path / "runs" / "nightly-20261130"


def test_export_passes_its_options_and_names_the_file_list(monkeypatch, tmp_path):
    from catalog_gen.review import export

    seen = []

    def fake_export(run_dir, approved, profile, allow_upscale):
        seen.append((run_dir, approved, profile, allow_upscale))
        return [approved / "a.jpg", approved / "b.jpg"]

    monkeypatch.setattr(export, "export_approved", fake_export)
    result = runner.invoke(app, ["export", str(tmp_path / "run"), "--approved", str(tmp_path / "out"),
                                 "--profile", "web"])
    assert result.exit_code == 0, result.output
    assert seen == [(tmp_path / "run", tmp_path / "out", "web", False)]
    assert "exported 2 approved image(s)" in result.stdout and "export.csv" in result.stdout


def test_export_of_an_unreviewed_run_exits_2_naming_the_run(tmp_path):
    (tmp_path / "run").mkdir()
    result = runner.invoke(app, ["export", str(tmp_path / "run"), "--approved", str(tmp_path / "out")])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "review the run first" in result.stderr and str(tmp_path / "run") in result.stderr


def test_sweep_parses_the_grid_and_prints_the_table(monkeypatch, tmp_path):
    from catalog_gen.evaluate import sweep

    seen = []

    def fake_run_sweep(source, class_key, instance, workdir, name, grid, train, evaluation, progress=None,
                       steps_progress=None):
        seen.append((class_key, instance, name, grid, train.base_model))
        out = tmp_path / "sweep"
        out.mkdir(exist_ok=True)
        (out / "results.md").write_text("| steps | kid |\n")
        return out

    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    (tmp_path / "photos" / "ring" / "band").mkdir(parents=True)
    (tmp_path / "photos" / "ring" / "band" / "1.jpg").write_bytes(b"not read: the sweep is faked")
    result = runner.invoke(app, ["sweep", "--class", "ring", "--instance", "band", "--name", "s1", "--workdir",
                                 str(tmp_path), "--photos", str(tmp_path / "photos"), "--recipe", "tiny_demo",
                                 "--grid", "steps=10,20 lora_rank=4"])
    assert result.exit_code == 0, result.output
    assert seen == [("ring", "band", "s1", {"steps": [10, 20], "lora_rank": [4]}, "tiny")]
    assert "| steps | kid |" in result.stdout and "results.parquet" in result.stdout


def test_sweep_with_a_bad_grid_exits_2_before_training(monkeypatch, tmp_path):
    from catalog_gen.evaluate import sweep

    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: pytest.fail("trained despite a bad grid"))
    result = runner.invoke(app, ["sweep", "--class", "ring", "--instance", "band", "--name", "s1",
                                 "--grid", "steps"])
    assert result.exit_code == EXIT_BAD_INPUT and "steps" in result.stderr


# ---------------------------------------------------------------- bad paths and files: one line, exit 2

def test_a_file_where_a_folder_is_wanted_is_a_one_line_error(sample_catalogue, tmp_path):
    a_file = tmp_path / "afile"
    a_file.write_text("not a folder")
    result = runner.invoke(app, ["train", "--class", "ring", "--products", str(sample_catalogue.products_csv),
                                 "--workdir", str(a_file), "--recipe", "tiny_demo", "--steps", "1"])
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "afile: a file is in the way where a folder is needed" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("option", ["--skus", "--products", "--photos"])
def test_a_folder_where_a_file_is_wanted_or_the_reverse_says_so(option, tmp_path):
    folder, a_file = tmp_path / "adir", tmp_path / "afile.csv"
    folder.mkdir()
    a_file.write_text("x")
    if option == "--skus":
        args, message = ["generate", "--skus", str(folder), "--recipe", "tiny_nightly"], "is a folder; give the .csv"
    elif option == "--products":
        args, message = ["train", "--class", "ring", "--products", str(folder)], "is a folder; give the .csv"
    else:
        args, message = ["train", "--class", "ring", "--photos", str(a_file)], "is a file; give the folder"
    result = runner.invoke(app, args)
    assert result.exit_code == EXIT_BAD_INPUT and message in result.stderr, result.output


def test_a_template_that_is_not_a_string_names_the_key(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text('[generate]\nbase_model = "tiny"\n[templates]\nhoops = 5\n')
    result = runner.invoke(app, ["generate", "--skus", str(tmp_path / "s.csv"), "--recipe", str(recipe)])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "[templates] hoops must be a prompt template string, got 5" in result.stderr


def test_generate_into_a_workdir_without_adapters_is_refused_and_writes_nothing(tmp_path):
    sheet = tmp_path / "s.csv"
    sheet.write_text("sku,class,instance\nA,ring,band\n")
    result = runner.invoke(app, ["generate", "--skus", str(sheet), "--workdir", str(tmp_path / "nowhere"),
                                 "--recipe", "tiny_nightly"])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "holds no trained adapters" in result.stderr and not (tmp_path / "nowhere").exists()


def test_export_of_a_missing_run_or_a_corrupt_decisions_file_is_one_line(tmp_path):
    result = runner.invoke(app, ["export", str(tmp_path / "nowhere"), "--approved", str(tmp_path / "out")])
    assert result.exit_code == EXIT_BAD_INPUT and "does not exist" in result.stderr
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "decisions.parquet").write_text("garbage")
    result = runner.invoke(app, ["export", str(run_dir), "--approved", str(tmp_path / "out")])
    assert result.exit_code == EXIT_BAD_INPUT and "cannot read decisions" in result.stderr
    assert "Traceback" not in result.output


def test_version_and_help_text_shown_as_written():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("catalog-gen ")
    result = runner.invoke(app, ["eval", "--help"])
    assert result.exit_code == 0 and "[eval] section" in result.stdout  # not eaten as markup


def test_train_takes_tokens_chosen_by_hand(fake_train, sample_catalogue):
    fake = fake_train()
    result = _train(sample_catalogue, "--token", "band=qvj", "--token", " bold = qzv ")
    assert result.exit_code == 0, result.output
    assert fake.calls[0]["chosen_tokens"] == {"band": "qvj", "bold": "qzv"}
    result = _train(sample_catalogue, "--token", "band")
    assert result.exit_code == EXIT_BAD_INPUT and "expected INSTANCE=TOKEN" in result.stderr


def test_one_name_means_one_thing_on_every_command_and_recipe(tmp_path):
    """`steps` is training steps everywhere; denoising steps are `inference_steps` (generate, eval, sweep axis)."""
    from catalog_gen.config import GenerateConfig, TrainConfig
    from catalog_gen.evaluate.evaluation import EvalConfig
    from catalog_gen.evaluate.sweep import AXES

    assert "steps" in {f.name for f in dataclasses.fields(TrainConfig)}
    for config in (GenerateConfig, EvalConfig):
        names = {f.name for f in dataclasses.fields(config)}
        assert "inference_steps" in names and "steps" not in names
    assert all(axis == field for axis, (_, field) in AXES.items())  # a grid axis is its recipe key
    help_text = runner.invoke(app, ["generate", "--help"]).stdout
    assert "--inference-steps" in help_text and "\n  --steps" not in help_text
    assert "--lora-rank" in runner.invoke(app, ["train", "--help"]).stdout
    recipe = tmp_path / "old.toml"
    recipe.write_text('[generate]\nsteps = 20\n')
    result = runner.invoke(app, ["generate", "--skus", str(tmp_path / "s.csv"), "--recipe", str(recipe)])
    assert result.exit_code == EXIT_BAD_INPUT and "steps is now inference_steps" in result.stderr
