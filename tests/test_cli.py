"""The CLIs generated from the config dataclasses: the generator, every CLI's flags, --version, console scripts."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.cli import package_version, run_cli
from common.dataclass_cli import Flag, add_config_arguments, config_from_args, option_name

ROOT = Path(__file__).resolve().parent.parent


class Colour(str, enum.Enum):
    RED = "red"
    BLUE = "blue"


class ToyError(Exception):
    pass


@dataclass
class Toy:
    source: Path = field(metadata={"help": "where from"})
    size: int = field(default=3, metadata={"help": "how many"})
    ratio: float | None = field(default=None, metadata={"help": "a fraction"})
    colour: Colour = field(default=Colour.RED, metadata={"help": "which colour"})
    colours: tuple[Colour, ...] = field(default=(Colour.RED, Colour.BLUE), metadata={"help": "several"})
    sizes: tuple[int, ...] = field(default=(1, 2), metadata={"help": "integers"})
    fast: bool = field(default=True, metadata={"help": "go fast"})
    wait_s: float = field(default=1.5, metadata={"help": "seconds; 100% sure"})
    derived: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ToyError(f"--size must be >= 1, got {self.size}")


def toy_parser(**kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    add_config_arguments(parser, Toy, **kwargs)
    return parser


def test_generator_defaults_types_and_help():
    parser = toy_parser()
    ns = parser.parse_args(["--source", "x"])
    assert config_from_args(Toy, ns) == Toy(Path("x"))
    ns = parser.parse_args(["--source", "x", "--size", "5", "--ratio", "0.5", "--colour", "blue", "--colours",
                            "blue", "--sizes", "4,5,6", "--no-fast", "--wait", "2"])
    toy = config_from_args(Toy, ns)
    assert (toy.size, toy.ratio, toy.colour, toy.colours, toy.sizes, toy.fast, toy.wait_s) == (
        5, 0.5, Colour.BLUE, (Colour.BLUE,), (4, 5, 6), False, 2.0)
    text = parser.format_help()
    assert "how many (default: 3)" in text
    assert "{red,blue}" in text and "(default: red,blue)" in " ".join(text.split())
    assert "--fast, --no-fast" in text and "(default: --fast)" in text
    assert "100% sure (default: 1.5)" in " ".join(text.split())
    assert "--derived" not in text
    assert "--ratio RATIO  a fraction\n" in text or "a fraction\n" in text  # no "(default: None)"
    assert "default: None" not in text


def test_generator_refuses_bad_values_as_usage_errors(capsys):
    parser = toy_parser()
    for argv in (["--colour", "green"], ["--colours", "red,green"], ["--sizes", "1,x"], ["--size", "many"], []):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["--source", "x", *argv] if argv else argv)
        assert exc.value.code == 2
    assert "invalid choice 'green' (choose from red, blue)" in capsys.readouterr().err


def test_post_init_errors_come_out_as_one_line_and_exit_2(capsys):
    ns = toy_parser().parse_args(["--source", "x", "--size", "0"])
    assert run_cli(lambda: config_from_args(Toy, ns) and 0, (ToyError,), prog="toy") == 2
    assert capsys.readouterr().err == "toy: error: --size must be >= 1, got 0\n"


def test_flag_overrides_exclude_and_positional():
    def parse_even(text: str) -> int:
        if int(text) % 2:
            raise ToyError(f"{text} is odd")  # a package error: still a usage error
        return int(text)

    parser = toy_parser(flags={"source": Flag(positional=True), "size": Flag(names=("--count", "-n"), default=4,
                                                                              type=parse_even)},
                        exclude={"colours"})
    ns = parser.parse_args(["here", "-n", "6"])
    assert config_from_args(Toy, ns).size == 6 and ns.source == Path("here")
    assert parser.parse_args(["here"]).size == 4 and "(default: 4)" in parser.format_help()
    assert "--colours" not in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["here", "-n", "3"])
    with pytest.raises(TypeError, match="no field"):
        toy_parser(exclude={"nope"})

    @dataclass
    class Odd:
        table: dict = field(default_factory=dict)

    with pytest.raises(TypeError, match="table: no command-line form"):
        add_config_arguments(argparse.ArgumentParser(), Odd)


def test_key_value_dicts_and_include():
    @dataclass
    class Labels:
        labels: dict[str, str] = field(default_factory=dict, metadata={"help": "pod labels"})
        name: str = field(default="x", metadata={"help": "a name"})
        other: int = field(default=1, metadata={"help": "left out"})

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Labels, include={"labels", "name"})
    assert "--other" not in parser.format_help() and "pod labels (repeatable)" in parser.format_help()
    ns = parser.parse_args(["--labels", "a=1", "--labels", "b=c=d"])
    assert config_from_args(Labels, ns) == Labels({"a": "1", "b": "c=d"})
    assert parser.parse_args([]).labels == {} and Labels().labels == {}
    with pytest.raises(SystemExit):
        parser.parse_args(["--labels", "novalue"])


def test_option_names_drop_the_seconds_suffix():
    names = {f.name: option_name(f) for f in dataclasses.fields(Toy)}
    assert names["wait_s"] == "--wait" and names["size"] == "--size"


# ------------------------------------------------------------------------------------------ the four CLIs


def test_every_config_dataclass_has_a_command_line_form():
    """Each stage config can be generated (ManifestConfig too, for its conversion after the manifests split)."""
    from exporter.config import Budgets, BuildConfig
    from finetune.data import DataConfig
    from finetune.train import TrainConfig
    from loadtest.bench import BenchConfig
    from loadtest.cli import TUNE_FLAGS
    from loadtest.profile import ProfileConfig
    from loadtest.run import RunConfig
    from loadtest.soak import SoakConfig
    from loadtest.tune import TuneConfig
    from serving.repository import RepositoryConfig
    from serving.server import ServerConfig
    from serving.supervisor import SupervisorConfig

    cases = [(DataConfig, {}, ()), (TrainConfig, {}, ()), (BuildConfig, {}, ("budgets",)), (Budgets, {}, ()),
             (ServerConfig, {}, ("extra_args",)), (SupervisorConfig, {}, ()), (RepositoryConfig, {}, ("extra",)),
             (RunConfig, {}, ()), (BenchConfig, {}, ()), (ProfileConfig, {}, ()), (TuneConfig, TUNE_FLAGS, ()), (SoakConfig, {}, ())]
    for cls, flags, exclude in cases:
        parser = argparse.ArgumentParser()
        add_config_arguments(parser, cls, flags=flags, exclude=exclude)
        assert [a.dest for a in parser._actions[1:] if not a.help] == [], cls.__name__
    from serving.manifests import ManifestConfig

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ManifestConfig, exclude={"repository"})
    assert [a.dest for a in parser._actions[1:] if not a.help] == []
    assert all(f.metadata.get("help") for f in dataclasses.fields(ManifestConfig))


def parsers() -> dict[str, argparse.ArgumentParser]:
    from exporter.cli import parser as exporter_parser
    from finetune.cli import build_parser as finetune_parser
    from loadtest.cli import build_parser as loadtest_parser
    from serving.cli import build_parser as serving_parser

    return {"finetune": finetune_parser(), "exporter": exporter_parser(), "serving": serving_parser(),
            "loadtest": loadtest_parser()}


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


@pytest.mark.parametrize("name", ["finetune", "exporter", "serving", "loadtest"])
def test_every_flag_has_help_and_every_command_prints_help(name, capsys):
    parser = parsers()[name]
    missing = []
    for command, sub in {"": parser, **subparsers(parser)}.items():
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help:
                missing.append(f"{command} {'/'.join(action.option_strings) or action.dest}")
        assert "%(default)" not in sub.format_help()
    assert missing == []
    for command in subparsers(parser):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([command, "--help"])
        assert exc.value.code == 0
    capsys.readouterr()


@pytest.mark.parametrize("module", ["finetune.cli", "exporter.cli", "serving.cli", "loadtest.cli"])
def test_version_on_every_cli(module, capsys):
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(module).main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("python -m ") and out.strip().endswith(package_version())


def test_defaults_are_the_dataclasses():
    from exporter.config import Budgets, BuildConfig
    from loadtest.soak import SoakConfig
    from serving.server import ServerConfig
    from serving.supervisor import SupervisorConfig

    all_parsers = parsers()
    up = all_parsers["serving"].parse_args(["up"])
    assert up.startup_timeout_s == ServerConfig.startup_timeout_s == 120.0  # the help used to say 180
    assert up.check_interval_s == SupervisorConfig.check_interval_s
    assert (up.http_port, up.grpc_port, up.metrics_port, up.repository) == (8000, 8001, 8002,
                                                                           Path("model_repository"))
    build = all_parsers["exporter"].parse_args(["build", "ckpt"])
    assert config_from_args(Budgets, build) == Budgets()
    config = config_from_args(BuildConfig, build, budgets=Budgets())
    assert config == BuildConfig(Path("ckpt"))
    layout = all_parsers["exporter"].parse_args(["build", "ckpt", "--instances", "3", "--intra-op-threads", "2",
                                                 "--no-pin-instances"])
    config = config_from_args(BuildConfig, layout, budgets=Budgets())
    assert (config.instances, config.intra_op_threads, config.pin_instances) == (3, 2, False)
    soak = all_parsers["loadtest"].parse_args(["soak"])
    assert soak.duration == SoakConfig.duration


def test_existing_spellings_keep_working():
    from exporter.config import Precision, Target
    from finetune.train import Precision as TrainPrecision
    from serving.cli import Output

    p = parsers()
    build = p["exporter"].parse_args(["build", "ckpt", "--no-repository", "--target", "gpu", "--precisions",
                                      "fp16,int8", "--max-accuracy-drop", "1.5", "--exhaustive-int8", "-v"])
    assert build.exhaustive and not p["exporter"].parse_args(["build", "ckpt"]).exhaustive
    assert p["exporter"].parse_args(["build", "ckpt", "--exhaustive"]).exhaustive
    assert build.repository is None and build.target is Target.GPU and build.verbose
    assert build.precisions == (Precision.FP16, Precision.INT8) and build.int8_max_accuracy_drop == 1.5
    train = p["finetune"].parse_args(["train", "--data", "d", "--out", "o", "--no-bf16", "--no-group-by-length"])
    assert train.precision is TrainPrecision.FP32 and train.group_by_length is False
    bench = p["loadtest"].parse_args(["bench", "--no-build", "--no-served", "--no-batch1", "--concurrency", "1,8",
                                      "--protocols", "grpc", "--bf16", "off"])
    assert (bench.build, bench.served, bench.pipeline_batch1, bench.concurrency, bench.protocols) == (
        None, False, False, (1, 8), ("grpc",))
    tune = p["loadtest"].parse_args(["tune", "--no-apply", "--layouts", "2x1,1x2", "--queue-delays-us", "0,100",
                                     "--max-batch-sizes", "8"])
    assert (tune.apply, tune.layouts, tune.queue_delays_us, tune.max_batch_sizes) == (
        False, ((2, 1), (1, 2)), (0, 100), (8,))
    with pytest.raises(SystemExit):
        p["loadtest"].parse_args(["tune", "--max-batch-sizes", "0"])
    run = p["loadtest"].parse_args(["run", "--start-server", "--fail-on-error", "--duration", "5s"])
    assert run.start_server and run.fail_on_error and run.duration == "5s"
    classify = p["serving"].parse_args(["classify", "--json", "--timeout", "3", "a", "b"])
    assert classify.output is Output.JSON and classify.timeout_s == 3 and classify.texts == ["a", "b"]
    up = p["serving"].parse_args(["up", "--startup-timeout", "9", "--exit-timeout", "3", "--no-supervise"])
    assert (up.startup_timeout_s, up.exit_timeout_s, up.no_supervise) == (9.0, 3, True)


def test_manifests_spellings_and_defaults():
    """`serving manifests`: the hand-written flags' spellings, generated; its defaults are ManifestConfig's."""
    from serving.manifests import ManifestConfig, config_from_args as manifest_config
    from serving.manifests.values import KServeMode, ServiceType
    from serving.repository import Target

    required = ["manifests", "--image", "reg/img:1", "--repository-uri", "s3://bucket/repo"]
    parser = parsers()["serving"]
    default = manifest_config(parser.parse_args(required))
    assert default == ManifestConfig("reg/img:1", "s3://bucket/repo")
    assert default.repository.target is Target.GPU
    args = parser.parse_args([
        *required, "--no-namespace-object", "--no-autoscale", "--exit-timeout-secs", "7", "--startup-timeout", "60",
        "--service-type", "NodePort", "--credentials-secret", "", "--service-account-annotation", "a/b=c=d",
        "--service-account-annotation", "e=f", "--node-selector", "pool=gpu", "--writable-root-fs",
        "--no-service-monitor", "--service-monitor-label", "release=kps", "--no-kserve", "--kserve-mode",
        "Serverless", "--locust-workers", "3", "--no-network-policy", "--target", "cpu",
        "--gpus-per-pod", "0", "--max-batch-size", "8", "--encoder-instances", "2", "--max-batch-tokens", "8192", "--validate", "--out", "k"])
    config = manifest_config(args)
    assert (config.create_namespace, config.autoscale, config.exit_timeout_s, config.startup_timeout_s) == (
        False, False, 7, 60)
    assert (config.service_type, config.kserve_mode, config.credentials_secret) == (
        ServiceType.NODE_PORT, KServeMode.SERVERLESS, None)
    assert config.service_account_annotations == {"a/b": "c=d", "e": "f"}
    assert (config.node_selector, config.service_monitor_labels) == ({"pool": "gpu"}, {"release": "kps"})
    assert not (config.read_only_root_fs or config.service_monitor or config.kserve or config.network_policy)
    assert parser.parse_args([*required, "--require-digest"]).require_digest and not default.require_digest
    assert config.locust_workers == 3 and (args.validate, args.out) == (True, Path("k"))
    assert (config.repository.target, config.repository.max_batch_size, config.repository.encoder_instances,
            config.repository.max_batch_tokens) == (Target.CPU, 8, 2, 8192)
    text = " ".join(subparsers(parser)["manifests"].format_help().split())
    assert "(default: 20000)" in text and "(default: gpu)" in text and "(repeatable)" in text


def test_target_has_choices(capsys):
    for name, argv in (("exporter", ["build", "ckpt"]), ("serving", ["validate", "repo"])):
        with pytest.raises(SystemExit) as exc:
            parsers()[name].parse_args([*argv, "--target", "tpu"])
        assert exc.value.code == 2
        assert "invalid choice 'tpu' (choose from cpu, gpu)" in capsys.readouterr().err


def test_config_errors_exit_2_with_one_line(tmp_path, capsys):
    from exporter.cli import main as exporter_main
    from serving.cli import main as serving_main

    assert exporter_main(["build", str(tmp_path), "--out", "same", "--repository", "same"]) == 2
    assert serving_main(["up", "--startup-timeout", "0", "--repository", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-2:] == ["python -m exporter: error: --repository and --out must be different directories",
                        "python -m serving: error: startup_timeout_s must be > 0 and exit_timeout_s >= 0"]


# ------------------------------------------------------------------------------------ console scripts, size


def project() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_console_scripts_resolve_to_the_stage_mains():
    scripts = project()["scripts"]
    assert set(scripts) == {"textclf-finetune", "textclf-export", "textclf-serve", "textclf-loadtest"}
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        main = getattr(importlib.import_module(module), attr)
        assert callable(main)
        package = module.split(".")[0]
        assert (ROOT / package / "__main__.py").read_text().count(f"from {module} import {attr}") == 1, name


def test_console_script_name_is_the_prog(monkeypatch, capsys):
    from serving.cli import main

    monkeypatch.setattr(sys, "argv", ["/venv/bin/textclf-serve"])
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("textclf-serve ")


CLI_MODULES = ("common/cli.py", "common/dataclass_cli.py", "finetune/cli.py", "exporter/cli.py", "serving/cli.py",
               "serving/manifests/cli.py", "loadtest/cli.py")


def test_cli_functions_are_under_60_lines():
    long = []
    for rel in CLI_MODULES:
        for node in ast.walk(ast.parse((ROOT / rel).read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{rel}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []


def test_fp_max_abs_help_says_logits_as_the_gate_measures(capsys):
    """Issue 19: the help said 'probability' while exporter.parity gates the largest absolute logit difference."""
    from exporter.cli import main

    with pytest.raises(SystemExit):
        main(["build", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--fp32-max-abs", "--fp16-max-abs"):
        help_text = text.rsplit(flag, 1)[1].split(" --", 1)[0]  # the option list, after the usage line
        assert "LOGIT" in help_text and "probability" not in help_text


def test_classify_table_of_a_50_label_model_shows_the_label_at_80_columns():
    """Issue 19: a column per label squeezed the label column to nothing at 80 columns."""
    import io

    from rich.console import Console

    from serving.cli import ClassifyConfig, classify_table
    from serving.contract import Prediction

    labels = [f"category_{i:02d}" for i in range(50)]
    probs = {name: (0.5 if i == 37 else 0.5 / 49) for i, name in enumerate(labels)}
    preds = [Prediction(label="category_37", score=0.5, probabilities=probs)] * 2
    config = ClassifyConfig(texts=["a long enough text to be folded by the table " * 2, "short"])
    out = io.StringIO()
    Console(file=out, width=80, color_system=None).print(classify_table(config, preds, 80))
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert sum("category_37" in line for line in lines) >= 2  # the label, in full, on each row
    small = [Prediction(label="b", score=0.6, probabilities={"a": 0.4, "b": 0.6})]
    out = io.StringIO()
    Console(file=out, width=80, color_system=None).print(classify_table(ClassifyConfig(texts=["t"]), small, 80))
    assert "0.400" in out.getvalue() and "0.600" in out.getvalue()  # few labels: a column each, as before
