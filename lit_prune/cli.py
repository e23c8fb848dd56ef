"""Command line: `fit` / `validate` through LightningCLI, plus the project's own subcommands."""

from __future__ import annotations

import errno
import math
import os
import re
import sys
from argparse import SUPPRESS, ArgumentError
from pathlib import Path

from lit_prune.cli_manners import stored_help, top_level_help, with_suggestion
from lit_prune.errors import LitPruneError, Terminated, described, first_line, invalid

EXTRA_COMMANDS: dict[str, str] = {  # name -> "module:function"
    "prune": "lit_prune.commands.prune:main",
    "study": "lit_prune.commands.study:main",
    "report": "lit_prune.commands.report:main",
    "export": "lit_prune.commands.export:main",
}
# the sections of a config (and of its study: section) that hold key: value settings
SECTIONS = ("model", "data", "trainer", "study", "model.sae", "study.model", "study.data", "study.survival")
SECTIONS += ("study.transfer", "study.ablation")
# failed reads and writes of the user's paths (a full disk, a read-only folder, ...): one line
IO_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.ENOENT}
IO_ERRORS |= {errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EFBIG}
LIGHTNING_COMMANDS = ("fit", "validate")  # LightningCLI's, but test and predict: an SAE has no such steps
# shared code names the fields of fit and study's configs; how a command spells them, where it differs
OPTION_NAMES: dict[str, dict[str, str]] = {
    "prune": {"model_name": "model", "data.cache_dir": "cache_dir"},
    "": {"model_name": "model.model_name", "model_cache_dir": "model.model_cache_dir"},  # the others
}
OPTION_NAMES[""].update({"hook_layer": "model.hook_layer", "sae": "model.sae"})


DESCRIPTION = (
    "What does weight pruning do to the features a language model has learned? fit and validate "
    "train and evaluate an SAE on a (pruned) LM's activations; the other commands are prune (write a "
    "pruned model), study (the whole grid, resumable, with a report), report (write a study's "
    "report from its finished steps) and export (SAEs as a release for sae-lens' registry and "
    "Neuronpedia). `python -m lit_prune <command> --help` explains each option."
)


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class _ParserBuilt(Exception):
    def __init__(self, parser) -> None:
        super().__init__("parser built")
        self.parser = parser


def lightning_parser(args: list[str]):
    """The root parser lightning_cli(args) builds, without parsing args (lit_prune.help_snapshot)."""
    try:
        lightning_cli(args, parser_only=True)
    except _ParserBuilt as built:
        return built.parser
    raise AssertionError("LightningCLI parsed without calling parse_arguments")


def lightning_cli(args: list[str] | None = None, run: bool = True, parser_only: bool = False):
    """The LightningCLI over SAEModule and TokenDataModule (configs in configs/*.yaml); a model.class_path
    (configs/recovery.yaml: PrunedLMModule) makes the model section pick its LightningModule."""
    import lightning as L
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.cli import LightningCLI

    from lit_prune.lit.datamodule import TokenDataModule
    from lit_prune.lit.sae_module import RESUME_FREE, SAEModule, check_resumed_settings
    from lit_prune.lit.trainer_settings import checked_trainer

    set_parsing_settings(docstring_parse_attribute_docstrings=True)

    class LitPruneCLI(LightningCLI):
        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {
                name: skip for name, skip in LightningCLI.subcommands().items() if name in LIGHTNING_COMMANDS
            }

        def add_arguments_to_parser(self, parser) -> None:
            model = "model.init_args" if chosen else "model"
            if chosen:  # a section without class_path (configs/smollm2.yaml's) is still SAEModule's
                parser.set_defaults({"model": {"class_path": f"{SAEModule.__module__}.SAEModule"}})
            parser.link_arguments(f"{model}.model_name", "data.model_name")
            parser.link_arguments(f"{model}.model_cache_dir", "data.model_cache_dir")
            # a config's study: section is read by `study` (which checks it) and ignored by fit: accepted
            # as it is and kept out of fit's --help
            parser.add_argument("--study", type=dict | None, default=None, help=SUPPRESS)

        def parse_arguments(self, parser, args) -> None:
            if parser_only:
                raise _ParserBuilt(parser)
            try:
                super().parse_arguments(parser, args)
            except ArgumentError as err:  # a misspelt option: one line with the closest valid one
                raise with_suggestion(err, parser, sys.argv[1:] if args is None else list(args)) from None
            config = self.config.get(self.config.get("subcommand")) or self.config
            seed = config.get("seed_everything")
            if not isinstance(seed, bool) and isinstance(seed, int) and not 0 <= seed < 2**32:
                raise invalid(
                    "seed_everything", seed, "an integer from 0 to 2**32 - 1, true (a random one) or false"
                )
            given = config.get("model")  # resume checks: the LightningModule's settings as given
            if chosen and given is not None:
                given = given.get("init_args")
            self.given_model = given.clone() if given is not None else None
            check_finite(config.as_dict())
            check_output_dirs(config.get("trainer") or {})  # before seeding: its log line would come first
            if config.get("ckpt_path"):  # before Lightning reads its hyperparameters
                check_checkpoint(config["ckpt_path"])

        def before_instantiate_classes(self) -> None:
            # with --ckpt_path, Lightning has just replaced the model settings by the checkpoint's
            config = self.config.get(self.config.get("subcommand")) or self.config
            if config.get("ckpt_path") and self.given_model is not None:
                resumed = config["model"]["init_args"] if chosen else config["model"]
                for key in RESUME_FREE:  # this run's settings, not the checkpoint's
                    if key in self.given_model:
                        resumed[key] = self.given_model[key]
                prefix = "model.init_args." if chosen else "model."
                check_resumed_settings(self.given_model.as_dict(), resumed.as_dict(), prefix)

        def instantiate_trainer(self, **kwargs):
            return checked_trainer(lambda: super(LitPruneCLI, self).instantiate_trainer(**kwargs))

    chosen = chooses_model_class(sys.argv[1:] if args is None else args)
    return LitPruneCLI(
        L.LightningModule if chosen else SAEModule,
        TokenDataModule,
        subclass_mode_model=chosen,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        # no usage text before a bad option's error: main prints it as one line
        parser_kwargs={
            "prog": "python -m lit_prune",
            "description": DESCRIPTION,
            "exit_on_error": False,
            "allow_abbrev": False,  # --trainer.max_epoch is a typo, not --trainer.max_epochs
            **{name: {"exit_on_error": False, "allow_abbrev": False} for name in LIGHTNING_COMMANDS},
        },
    )


def chooses_model_class(argv: list[str]) -> bool:
    """Whether the command line or one of its --config files names model.class_path (or asks for
    --model.help): only then is the model section a choice of LightningModule."""
    import yaml

    for i, arg in enumerate(argv):
        if arg.startswith(("--model.class_path", "--model.help", "--model=")):
            return True
        path = arg.partition("=")[2] if arg.startswith("--config=") else None
        if arg in ("--config", "-c") and i + 1 < len(argv):
            path = argv[i + 1]
        if path is not None and Path(path).is_file():
            try:
                config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                continue  # check_config_files reports it
            model = config.get("model") if isinstance(config, dict) else None
            if isinstance(model, dict) and "class_path" in model:
                return True
    return False


def main(argv: list[str] | None = None) -> int:
    from_shell = argv is None
    argv = sys.argv[1:] if from_shell else argv
    _quiet_libraries()
    try:
        commands = (*LIGHTNING_COMMANDS, *EXTRA_COMMANDS)
        if argv and not argv[0].startswith("-") and argv[0] not in commands:
            raise invalid("command", argv[0], "one of " + ", ".join(commands))
        if argv and argv[0] in (*LIGHTNING_COMMANDS, "study"):
            check_config_files(argv[1:])
        if argv in (["--help"], ["-h"]):  # written here: no parser, no torch
            print(top_level_help(DESCRIPTION))
            return 0
        stored = stored_help(argv)  # fit / validate / study --help without torch and Lightning
        if stored is not None:
            sys.stdout.write(stored)
            return 0
        if argv and argv[0] in EXTRA_COMMANDS:
            import importlib

            module, function = EXTRA_COMMANDS[argv[0]].split(":")
            return getattr(importlib.import_module(module), function)(argv[1:]) or 0
        lightning_cli(None if from_shell else argv)  # LightningCLI reads sys.argv itself
    except KeyboardInterrupt as interrupt:
        return _interrupted(argv, interrupt)
    except SystemExit as exit_:
        if isinstance(exit_.__context__, KeyboardInterrupt):  # Lightning's exit(1) after its shutdown
            return _interrupted(argv, exit_.__context__)
        raise
    except ArgumentError as err:  # jsonargparse's, for an option of the wrong type or an unknown key
        print(f"error: {_argument_message(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in IO_ERRORS:
            raise
        print(f"error: {_io_message(err, argv)}", file=sys.stderr)
        return 2
    except Exception as err:
        ours = _our_error(err)
        if ours is None:
            raise
        where = "" if isinstance(ours, LitPruneError) else "trainer settings: "  # Lightning's own message
        names = OPTION_NAMES.get(argv[0] if argv else "", OPTION_NAMES[""])
        print(f"error: {where}{_named_as_option(first_line(ours), names)}", file=sys.stderr)
        return 2
    return 0


def _io_message(err: OSError, argv: list[str]) -> str:
    """A failed read or write as one line: the path and the cause."""
    where = err.filename if err.filename is not None else "writing the outputs"
    resumes = "; finished steps are kept: the same command resumes the study" if argv[:1] == ["study"] else ""
    return f"{where}: {err.strerror or err}{resumes}"


def _argument_message(err: ArgumentError) -> str:
    """jsonargparse's message in one line; a value of the wrong type in the house style."""
    message = " ".join(str(err).split())
    wrong = re.fullmatch(r'Parser key "([^"]+)": Expected a <class \'(\w+)\'>\. Got value: (.*)', message)
    if wrong is None:
        return message
    key, kind, value = wrong.groups()
    return str(invalid(key, value, "a finite float" if kind == "float" else f"a value of type {kind}"))


def check_finite(config: object, key: str = "") -> None:
    """Every float setting is finite: YAML's .inf / .nan parse as floats, and no setting means them."""
    if isinstance(config, float) and not math.isfinite(config):
        raise invalid(key, config, "a finite number")
    if isinstance(config, list) and any(isinstance(v, float) and not math.isfinite(v) for v in config):
        raise invalid(key, config, "a list of finite numbers")
    items = (
        config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else []
    )
    for name, value in items:
        check_finite(value, f"{key}.{name}" if key else str(name))


def check_config_files(argv: list[str]) -> None:
    """Each --config file is readable YAML whose sections are mappings: one line naming the file,
    not a parser's traceback or (for `study:` written as a list) a silently ignored section."""
    import yaml

    for i, arg in enumerate(argv):
        path = arg.partition("=")[2] if arg.startswith("--config=") else None
        if arg in ("--config", "-c") and i + 1 < len(argv):
            path = argv[i + 1]
        if path is None or not Path(path).is_file():
            continue  # jsonargparse also takes a config as a string, and names a missing file itself
        try:
            config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise invalid("--config", path, f"a readable YAML file ({_yaml_problem(err)})") from None
        if config is None:  # jsonargparse's own message would be "Unexpected config:"
            raise invalid("--config", path, "a YAML mapping of sections (the file holds none)")
        if not isinstance(config, dict):
            raise invalid("--config", path, f"a YAML mapping of sections, not a {type(config).__name__}")
        for name, section in (config or {}).items():
            if name in SECTIONS and section is not None and not isinstance(section, dict):
                raise invalid(
                    name, section, f"a mapping (`{name}:` followed by indented key: value lines) in {path}"
                )
            for sub, value in (section or {}).items() if isinstance(section, dict) else ():
                if f"{name}.{sub}" in SECTIONS and value is not None and not isinstance(value, dict):
                    raise invalid(f"{name}.{sub}", value, f"a mapping of settings in {path}")


def _yaml_problem(err: Exception) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(err, 'problem', None) or first_line(err)}{where}"


def check_output_dirs(trainer) -> None:
    """Where Lightning will write checkpoints and logs can be written: tried before training, not
    found out at the first checkpoint, after an epoch's work."""
    from lit_prune.files import check_writable

    dirs = {"trainer.default_root_dir": trainer.get("default_root_dir") or os.getcwd()}
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init_args = logger.get("init_args") if hasattr(logger, "get") else None
        if init_args is not None and init_args.get("save_dir"):
            dirs["trainer.logger.init_args.save_dir"] = init_args["save_dir"]
    for field, path in dirs.items():
        check_writable(field, path)


def check_checkpoint(path: str) -> None:
    """--ckpt_path is an existing, complete checkpoint (a truncated one has no zip directory)."""
    import zipfile

    if not Path(path).is_file():
        raise invalid("ckpt_path", path, "an existing checkpoint file (.ckpt) written by fit")
    try:
        with zipfile.ZipFile(path):
            pass
    except (OSError, zipfile.BadZipFile) as err:
        raise invalid("ckpt_path", path, f"a complete checkpoint written by fit ({described(err)})") from None


def _interrupted(argv: list[str], interrupt: KeyboardInterrupt) -> int:
    """Ctrl-C or SIGTERM: one line and the shell's status for the signal (130 or 143)."""
    resumes = ": finished steps are kept; the same command resumes the study" if argv[:1] == ["study"] else ""
    terminated = isinstance(interrupt, Terminated)
    print(f"{'terminated' if terminated else 'interrupted'}{resumes}", file=sys.stderr)
    return 143 if terminated else 130


def _named_as_option(message: str, names: dict[str, str]) -> str:
    """`field=value is invalid...` with the field as the command spells its option."""
    field, equals, rest = message.partition("=")
    head, dot, tail = field.partition(".")  # sae.k: a field of a section the command names (model.sae)
    if equals and field not in names and head in names:
        return names[head] + dot + tail + equals + rest
    return names[field] + equals + rest if equals and field in names else message


def _our_error(err: BaseException) -> Exception | None:
    """The user-facing error that caused `err`, if any: ours (jsonargparse wraps the one a callback's
    constructor raises in a many-line ValueError), or Lightning's for trainer settings it refuses."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, (LitPruneError, MisconfigurationException)):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
