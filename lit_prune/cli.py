"""Command line: `fit` / `validate` through LightningCLI, plus the project's own subcommands."""

from __future__ import annotations

import os
import sys

from lit_prune.errors import LitPruneError, first_line, invalid

EXTRA_COMMANDS: dict[str, str] = {  # name -> "module:function"
    "prune": "lit_prune.commands.prune:main",
    "study": "lit_prune.commands.study:main",
    "report": "lit_prune.commands.report:main",
    "export": "lit_prune.commands.export:main",
}
LIGHTNING_COMMANDS = ("fit", "validate")  # LightningCLI's, but test and predict: an SAE has no such steps
# shared code names the fields of fit and study's configs; how a command spells them, where it differs
OPTION_NAMES: dict[str, dict[str, str]] = {
    "prune": {"model_name": "model", "data.cache_dir": "cache_dir"},
    "": {"model_name": "model.model_name", "model_cache_dir": "model.model_cache_dir"},  # the others
}


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


def lightning_cli(args: list[str] | None = None, run: bool = True):
    """The LightningCLI over SAEModule and TokenDataModule (configs in configs/*.yaml)."""
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.cli import LightningCLI

    from lit_prune.lit.datamodule import TokenDataModule
    from lit_prune.lit.sae_module import RESUME_FREE, SAEModule, check_resumed_settings
    from lit_prune.lit.trainer_settings import checked_trainer
    from lit_prune.study.config import StudySettings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)

    class LitPruneCLI(LightningCLI):
        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {
                name: skip for name, skip in LightningCLI.subcommands().items() if name in LIGHTNING_COMMANDS
            }

        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments("model.model_name", "data.model_name")
            parser.link_arguments("model.model_cache_dir", "data.model_cache_dir")
            parser.add_class_arguments(StudySettings, "study")  # read by `study`, ignored by fit

        def parse_arguments(self, parser, args) -> None:
            super().parse_arguments(parser, args)
            config = self.config.get(self.config.get("subcommand")) or self.config
            seed = config.get("seed_everything")
            if not isinstance(seed, bool) and isinstance(seed, int) and not 0 <= seed < 2**32:
                raise invalid(
                    "seed_everything", seed, "an integer from 0 to 2**32 - 1, true (a random one) or false"
                )
            self.given_model = config.get("model").clone() if config.get("model") is not None else None

        def before_instantiate_classes(self) -> None:
            # with --ckpt_path, Lightning has just replaced the model settings by the checkpoint's
            config = self.config.get(self.config.get("subcommand")) or self.config
            if config.get("ckpt_path") and self.given_model is not None:
                for key in RESUME_FREE:  # this run's settings, not the checkpoint's
                    config["model"][key] = self.given_model[key]
                check_resumed_settings(self.given_model.as_dict(), config["model"].as_dict())

        def instantiate_trainer(self, **kwargs):
            return checked_trainer(lambda: super(LitPruneCLI, self).instantiate_trainer(**kwargs))

    return LitPruneCLI(
        SAEModule,
        TokenDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "python -m lit_prune", "description": DESCRIPTION},
    )


def main(argv: list[str] | None = None) -> int:
    from_shell = argv is None
    argv = sys.argv[1:] if from_shell else argv
    _quiet_libraries()
    try:
        commands = (*LIGHTNING_COMMANDS, *EXTRA_COMMANDS)
        if argv and not argv[0].startswith("-") and argv[0] not in commands:
            raise invalid("command", argv[0], "one of " + ", ".join(commands))
        if argv and argv[0] in EXTRA_COMMANDS:
            import importlib

            module, function = EXTRA_COMMANDS[argv[0]].split(":")
            return getattr(importlib.import_module(module), function)(argv[1:]) or 0
        lightning_cli(None if from_shell else argv)  # LightningCLI reads sys.argv itself
    except KeyboardInterrupt:
        return _interrupted(argv)
    except SystemExit as exit_:
        if isinstance(
            exit_.__context__, KeyboardInterrupt
        ):  # Lightning's exit(1) after its graceful shutdown
            return _interrupted(argv)
        raise
    except Exception as err:
        ours = _our_error(err)
        if ours is None:
            raise
        where = "" if isinstance(ours, LitPruneError) else "trainer settings: "  # Lightning's own message
        names = OPTION_NAMES.get(argv[0] if argv else "", OPTION_NAMES[""])
        print(f"error: {where}{_named_as_option(first_line(ours), names)}", file=sys.stderr)
        return 2
    return 0


def _interrupted(argv: list[str]) -> int:
    """Ctrl-C: one line and the shell's status for SIGINT."""
    resumes = ": finished steps are kept; the same command resumes the study" if argv[:1] == ["study"] else ""
    print(f"interrupted{resumes}", file=sys.stderr)
    return 130


def _named_as_option(message: str, names: dict[str, str]) -> str:
    """`field=value is invalid...` with the field as the command spells its option."""
    field, equals, rest = message.partition("=")
    return names[field] + equals + rest if equals and field in names else message


def _our_error(err: BaseException) -> Exception | None:
    """The user-facing error that caused `err`, if any: ours (jsonargparse wraps the one a callback's
    constructor raises in a many-line ValueError), or Lightning's for trainer settings it refuses."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (LitPruneError, MisconfigurationException)):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
