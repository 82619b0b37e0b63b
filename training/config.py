"""A training run's options: `TrainConfig`, and the command line made from it and `ModelConfig`.

Each option is a dataclass field; its default, help and flag spelling live there and nowhere
else, and the parser is generated from the fields. The parser leaves out the options not
written on the command line (`argument_default=SUPPRESS`), so what the user gave is known
without comparing values to defaults: a resumed run takes the flags that define it from its
checkpoint unless they were given, even when given with their default value.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from data.augment import parse_level
from data.dataset import MAX_TRAIN_TOKENS
from data.spelling import SPELLINGS
from model.im2latex import ModelConfig
from model.sampling import METHODS
from model.selection import LEGACY, METRICS
from training.sequence import METHODS as SEQ_TRAIN
from training.sequence import REWARDS

SCHEDULES = ("plateau", "cosine", "onecycle")  # training/schedule.py


def augment_level(text: str) -> float:
    try:
        return parse_level(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def count(expected: str, least: int = 0) -> Callable[[str], int]:
    """An argparse type for a whole number >= `least`; `expected` says what it counts."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = least - 1
        if n < least:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return n
    return parse


epoch_count = count("0 (off) or a number of epochs")
step_count = count("a number of steps >= 0")
sample_count = count("a number of samples >= 1", least=1)


def share(expected: str, below_one: bool) -> Callable[[str], float]:
    """An argparse type for a number in [0, 1] (in [0, 1) if `below_one`)."""
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            x = -1.0
        if not (0.0 <= x < 1.0 if below_one else 0.0 <= x <= 1.0):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return x
    return parse


smoothing = share("a label smoothing in [0, 1)", below_one=True)
mix_weight = share("a weight in [0, 1]", below_one=False)
share_of_images = share("a share in [0, 1]", below_one=False)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def option(default: Any = MISSING, help: str = "", *, run: bool = False,
           flags: tuple[str, ...] = (), factory: Callable[[], Any] | None = None,
           **argparse_kwargs: Any) -> Any:
    """A TrainConfig field and how it appears on the command line. `run`: the option defines
    the run (resume takes it from the checkpoint unless given); `flags`: its spellings (default
    `--NAME`); other keywords (type, choices, metavar) go to `add_argument`."""
    meta = {"help": help, "run": run, "flags": flags, "argparse": argparse_kwargs}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run is told, converted once from the command line (or built
    directly by tests and benchmarks)."""

    data_path: Path = option(help="dataset folder with shards/ and vocab.json", type=Path)
    save_dir: Path = option(help="where checkpoints and logs go", type=Path)
    # optimisation: these define the run
    lr: float = option(3e-4, run=True)
    min_lr: float = option(3e-5, run=True)
    lr_decay: float = option(0.5, run=True)
    lr_patience: int = option(3, run=True)
    clip: float = option(2.0, run=True)
    batch_size: int = option(32, run=True)
    max_len: int = option(MAX_TRAIN_TOKENS, "longer formulas are not trained on", run=True)
    epochs: int = option(15, "train up to this epoch", flags=("--epoches", "--epochs"))
    sample_method: str = option("teacher_forcing", run=True, choices=METHODS)
    decay_k: float = option(1.0, "scheduled-sampling decay (exp: k<1; inv_sigmoid: k>=1)",
                            run=True)
    seed: int = option(2020, run=True)
    augment: float = option(0.0, "augment training images on the fly (data/augment.py): none, "
                            "light, strong or a strength in [0, 1] (0, none: older runs "
                            "reproduce)", run=True, type=augment_level, metavar="LEVEL")
    augment_low_res: float = option(0.0, "share of augmented images also shrunk to a low "
                                    "resolution, 0.6x-0.85x (data/augment.py low_res; 0: older "
                                    "runs reproduce)", run=True, type=share_of_images,
                                    metavar="SHARE")
    augment_binary: float = option(0.0, "share of augmented images also binarized, as a "
                                   "rasterizer without anti-aliasing or a thresholded scan "
                                   "leaves them (data/augment.py binary; 0: older runs "
                                   "reproduce)", run=True, type=share_of_images,
                                   metavar="SHARE")
    label_spelling: str = option("as_is", "rewrite training labels so that what typesets "
                                 "the same has one spelling (data/spelling.py): references, "
                                 "the spelling of IM2LATEX-100K's references ({ \\cal L }, "
                                 "\\mathrm { d }, f ^ { \\prime }, \\rightarrow); "
                                 "references_braced, the same with accent arguments braced "
                                 "(\\hat { x }); commands "
                                 "(fonts as \\mathcal { L }); as_is: labels as built, older "
                                 "runs reproduce. Validation keeps its references", run=True,
                                 choices=["as_is", *SPELLINGS])
    select_by: str = option("acc", "validation figure that picks best.pt and drives the plateau "
                            "schedule and --early_stop: token accuracy or loss "
                            "(model/selection.py says why)", run=True, choices=list(METRICS))
    early_stop: int = option(0, "stop after N epochs without improvement of --select_by "
                             "(0: off)", run=True, type=epoch_count, metavar="N")
    freeze_encoder: bool = option(False, "train the decoder only", run=True)
    schedule: str = option("plateau", "learning-rate schedule (training/schedule.py says why "
                           "each): plateau (per epoch, --lr_decay/--lr_patience), cosine "
                           "(warm-up, cosine decay to --min_lr) or onecycle; fixed for a run",
                           run=True, choices=SCHEDULES)
    warmup_steps: int = option(0, "cosine/onecycle: optimizer steps of warm-up to --lr (0: "
                               "none for cosine, 30%% of the horizon for onecycle)", run=True,
                               type=step_count, metavar="N")
    schedule_steps: int = option(0, "cosine/onecycle: the step at which the rate reaches "
                                 "--min_lr (0: --epoches x steps per epoch)", run=True,
                                 type=step_count, metavar="N")
    label_smoothing: float = option(0.0, "label smoothing of the training loss only: the "
                                    "validation loss and token accuracy stay plain "
                                    "cross-entropy, so runs with and without it compare",
                                    run=True, type=smoothing, metavar="EPS")
    seq_train: str = option("none", "sequence-level fine-tuning after maximum-likelihood "
                            "training (training/sequence.py): scst, self-critical sequence "
                            "training against --seq_reward, mixed with the ML loss by "
                            "--seq_mix (dropout off); none: plain training, older runs "
                            "reproduce", run=True, choices=SEQ_TRAIN)
    seq_samples: int = option(4, "scst: sequences sampled per image (each step decodes K + 1 "
                              "per image and trains on K + 1)", run=True, type=sample_count,
                              metavar="K")
    seq_reward: str = option("bleu", "scst: a sequence's reward against its reference: "
                             "sentence BLEU-4 (smoothed) or edit (1 - token edit distance / "
                             "longer length)", run=True, choices=list(REWARDS))
    seq_mix: float = option(0.3, "scst: weight of the maximum-likelihood loss, mix * ML + "
                            "(1 - mix) * SCST (0: SCST alone)", run=True, type=mix_weight,
                            metavar="W")
    # run control
    resume: bool = option(False, "resume from the latest checkpoint in --save_dir",
                          flags=("--from_check_point", "--resume"))
    init_from: str | None = option(None, "start from these weights (fine-tuning)",
                                   metavar="CKPT")
    overwrite: bool = option(False, "start a new run in a --save_dir that already holds one")
    max_steps: int = option(0, "stop after this many steps in total (0: no limit)")
    max_minutes: float = option(0.0, "stop (after checkpointing) after this many minutes (0: no "
                                "limit)")
    save_every: int = option(500, "checkpoint every N steps (kept on resume unless given)",
                             run=True)
    print_freq: int = option(100, "log to stdout every N steps", run=True)
    workers: int = option(2, "data loader processes")
    device: str = option(factory=default_device)
    amp: str = option("auto", "bf16 autocast of the encoder (auto: where the hardware has bf16)",
                      choices=["auto", "on", "off"])
    threads: int = option(0, "CPU threads (0: torch default)")
    quiet: bool = option(False, "no progress bar")
    # the model a new run builds; vocab_size is the data's, set once the vocabulary is read
    model: ModelConfig = field(default_factory=partial(ModelConfig, vocab_size=0))

    def to_dict(self) -> dict[str, Any]:
        """Plain types, one flat mapping of option names (model ones included) as checkpoints
        keep it under "args" (loaded with weights_only=True: no Path objects)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        d.update(data_path=str(self.data_path), save_dir=str(self.save_dir))
        d.update(model_options(self.model))
        return d

    def resumed(self, saved: Mapping[str, Any], given: Iterable[str],
                log: Callable[[str], None] = print) -> tuple[TrainConfig, set[str]]:
        """Continue a run with the settings it was started with (`saved`: its checkpoint's
        "args"): options given on the command line win, and those that differ from the run's
        are returned (e.g. a lower `--lr` by hand for the last epochs). Runs saved before
        --select_by existed were selected by the loss, and those before --schedule by the
        plateau schedule with plain cross-entropy and no sequence-level training."""
        saved = {"select_by": LEGACY, "schedule": "plateau", "label_smoothing": 0.0,
                 "seq_train": "none", "label_spelling": "as_is", **saved}
        given, kept, changed = set(given), {}, set()
        for name in RUN_OPTIONS:
            if name not in saved:
                continue
            if name not in given:
                kept[name] = saved[name]
            elif getattr(self, name) != saved[name]:
                log(f"note: --{name} changed from {saved[name]} to {getattr(self, name)} on "
                    "resume")
                changed.add(name)
        return replace(self, **kept), changed


RUN_OPTIONS = tuple(f.name for f in fields(TrainConfig) if f.metadata.get("run"))
MODEL_OPTIONS = tuple(f.name for f in fields(ModelConfig) if f.name != "vocab_size")


def model_options(cfg: ModelConfig) -> dict[str, Any]:
    d = cfg.to_dict()
    return {name: d[name] for name in MODEL_OPTIONS}


def _add(group: Any, f: Field) -> None:
    """One field as a flag: bools are switches (`--no_NAME` for those on by default), tuples
    take one or more values, others their default's type unless the field says otherwise."""
    meta = f.metadata
    default = f.default_factory() if f.default_factory is not MISSING else f.default
    kwargs: dict[str, Any] = {"dest": f.name, **meta.get("argparse", {})}
    flags = meta.get("flags") or (f"--{f.name}",)
    if isinstance(default, bool):
        kwargs["action"] = "store_false" if default else "store_true"
        flags = meta.get("flags") or ((f"--no_{f.name}",) if default else flags)
    elif isinstance(default, tuple):
        kwargs.update(nargs="+", type=type(default[0]), metavar="N")
    elif default is MISSING:
        kwargs["required"] = True
    elif default is not None:
        kwargs.setdefault("type", type(default))
    kwargs["help"] = meta.get("help", "")
    if default is not MISSING and default is not None and not isinstance(default, bool):
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        kwargs["help"] += f" (default: {shown})"
    group.add_argument(*flags, **kwargs)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The command line of train.py. Options not given are absent from the parsed namespace;
    their defaults are TrainConfig's and ModelConfig's."""
    p = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    train_fields = [f for f in fields(TrainConfig) if f.name != "model"]
    required = p.add_argument_group("run")
    for f in train_fields[:2]:
        _add(required, f)
    model = p.add_argument_group(
        "model (a new run; resume takes the saved one; --init_from too, grown to a larger "
        "--dec_rnn_h, --emb_dim or --cnn_widths where given: model/widen.py)")
    for f in fields(ModelConfig):
        if f.name in MODEL_OPTIONS:
            _add(model, f)
    training = p.add_argument_group("training")
    for f in train_fields[2:]:
        _add(training, f)
    return p


def parse_args(argv: list[str] | None = None,
               description: str | None = None) -> tuple[TrainConfig, frozenset[str]]:
    """The run's config and the names of the options written on the command line."""
    given = vars(build_parser(description).parse_args(argv))
    model = {k: v for k, v in given.items() if k in MODEL_OPTIONS}
    if "cnn_widths" in model:
        model["cnn_widths"] = tuple(model["cnn_widths"])
    train = {k: v for k, v in given.items() if k not in MODEL_OPTIONS}
    cfg = TrainConfig(**train, model=ModelConfig(vocab_size=0, **model))
    return cfg, frozenset(given)
