"""The paper's CelebA experiment, end to end, for a user who has CelebA on disk.

``run_celeba(root, out_dir, ...)`` does what the attribute chapters do on the
generated SCM images, on CelebA at 64x64:

1. loads the aligned images (``flowjac.data.celeba``; nothing is downloaded);
2. trains (or loads from ``out_dir``) the paper's classifier, a ResNet50
   with a 40-logit head (ImageNet weights from a file the user supplies;
   ImageNet normalization is its first layer, whereas the authors fed it
   unnormalized images) on [0, 1] images with BCE, batch 128, lr 2e-4;
3. trains (or loads) a ``FlowUNet`` on the images in [-1, 1];
4. probes c∘φ with ``flowjac.engine.probing.probe``: logits, JVPs, pair JVPs for
   the covariance identity, the true gradient norm of Heavy_Makeup and the
   paper's one-direction change (unit direction, ε = 1e-2);
5. Table 6 on the paper's attributes 19, 28, 30 (Heavy_Makeup, Pointy_Nose,
   Rosy_Cheeks, mapped by name): corr(28, 30) for all latents, the paper's
   rule ``|Δc_19| < 1e-4``, the true norm's 20% quantile and the predicted
   label of 19; the data's label correlations as reference;
6. Figure 5 on all 40 attributes: the data's label correlation, the paper's
   JVP estimate, the identity's estimate and the classifier on samples;
7. PC (causal-learn) on the data's 40 labels, with the neighbourhood of
   Heavy_Makeup.

``CONFIGS["full"]`` is the paper's scale (a GPU job: tens of GPU-hours for
the flow at the paper's step count); ``CONFIGS["toy"]`` runs in seconds on a
CPU and is what the tests use on a fake CelebA folder. Explained in
:ref:`sec_attributes`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flowjac._checks import check_choice, check_int

__all__ = ["CONFIGS", "run_celeba"]

CONFIGS = {
    "toy": dict(image_size=16, n_images=None, flow_net=dict(
        base_channels=8, channel_mult=(1, 2), time_dim=16, norm_groups=4),
        flow_train_steps=3, flow_batch=8, flow_lr=1e-3, classifier_train_steps=2, classifier_batch=8,
        n_latents=4, k=1, method="midpoint", steps=2, n_labels=None,
        batch_size=4),
    "full": dict(image_size=64, n_images=None, flow_net=dict(
        base_channels=64, channel_mult=(1, 2, 2, 2), time_dim=256,
        norm_groups=8), flow_train_steps=100_000, flow_batch=128, flow_lr=2e-4,
        classifier_train_steps=20_000, classifier_batch=128, n_latents=10_000, k=2,
        method="midpoint", steps=20, n_labels=None, batch_size=250),
}


def run_celeba(root, out_dir, *, config: str = "full", weights_path=None,
               device="cpu", seed: int = 0, check_md5: bool = True,
               progress: bool = False, **overrides) -> dict:
    """Train or load the CelebA flow and classifier, probe them, and compute Table 6, Figure 5 and PC; :ref:`sec_attributes`.

    ``root`` holds ``celeba/`` in torchvision's layout; checkpoints and
    probes are cached in ``out_dir``. ``config`` is "full" or "toy";
    keyword ``overrides`` replace entries of that config. Returns a dict
    with ``table6``, ``figure5`` (matrices and MAEs against the data's label
    correlation), ``pc`` (endpoint matrix and Heavy_Makeup's neighbours),
    ``names`` and ``settings``.
    """
    from flowjac.causal.discovery import pc_discovery
    from flowjac.data.images import celeba
    from flowjac.engine import probing
    from flowjac.engine.checkpoints import load_or_train
    from flowjac.engine.train import train_flow
    from flowjac.engine.velocity import velocity_fn
    from flowjac.estimators import covariance
    from flowjac.estimators.moments import moment_to_corr
    from flowjac.models.classifiers import celeba_resnet50, load_or_train_classifier
    from flowjac.models.nets import FlowUNet
    from flowjac.models.quality import offdiag_mae
    from flowjac.pipelines.stored import label_corr

    check_choice("config", config, tuple(CONFIGS))
    cfg = dict(CONFIGS[config])
    unknown = sorted(set(overrides) - set(cfg))
    if unknown:
        raise ValueError(f"unknown settings {unknown}; allowed: {sorted(cfg)}")
    cfg.update(overrides)
    seed = check_int("seed", seed, minimum=0)
    dev = torch.device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = celeba(root, "train", image_size=cfg["image_size"],
                  check_md5=check_md5, verbose=False)
    x01, labels = data.tensors(cfg["n_images"])
    names = list(data.attr_names)
    h, a, b = (data.paper_index(i) for i in (19, 28, 30))

    torch.manual_seed(seed)
    clf = celeba_resnet50(weights_path, n_attr=len(names))
    clf, _ = load_or_train_classifier(
        out / "celeba_classifier.pt", clf, x01, labels,
        steps=cfg["classifier_train_steps"], batch_size=cfg["classifier_batch"], lr=2e-4,
        seed=seed, device=dev, progress=progress)
    clf.to(dev).eval().requires_grad_(False)

    def readout(x):             # flow space [-1, 1] -> the classifier's [0, 1]
        return clf((x + 1) / 2)

    torch.manual_seed(seed)
    size = cfg["image_size"]
    flow = FlowUNet(in_channels=3, image_size=size, **cfg["flow_net"]).to(dev)
    load_or_train(out / "celeba_flow.pt", flow, lambda m: train_flow(
        m, x01 * 2 - 1, steps=cfg["flow_train_steps"], batch_size=cfg["flow_batch"],
        lr=cfg["flow_lr"], ema_decay=0.999, seed=seed, device=dev, progress=progress),
        step=cfg["flow_train_steps"],
        config={k: v for k, v in cfg.items() if k != "flow_net"})
    flow.eval().requires_grad_(False)
    velocity = velocity_fn(flow)
    shape = (3, size, size)
    res = probing.probe(velocity, readout, shape, cfg["n_latents"],
                        k=cfg["k"], steps=cfg["steps"],
                        method=cfg["method"], seed=seed, device=dev,
                        dtype=torch.float32, batch_size=cfg["batch_size"],
                        grad_outputs=[h], progress=progress)
    logits, deltas = res["out"].double(), res["jvp"].double()
    pred = (logits > 0).double()
    n = logits.shape[0]

    from flowjac.estimators.moments import below_threshold, jvp_corr
    paper = res["paper_change"][:, h].double()
    norm = res["grad_norm"][:, 0].double()
    masks = {"all": torch.ones(n, dtype=torch.bool),
             "paper's rule |Δc_19| < 1e-4": paper < 1e-4,
             "true norm ≤ q20": below_threshold(norm, quantile=0.2),
             "predicted Heavy_Makeup = 0": pred[:, h] == 0,
             "predicted Heavy_Makeup = 1": pred[:, h] == 1}
    table6 = {}
    for key, m in masks.items():
        kept = int(m.sum())
        table6[key] = dict(
            n=kept,
            jvp=float(jvp_corr(deltas, m)[a, b]) if kept >= 2 else float("nan"),
            label=label_corr(pred[m], a, b) if kept >= 2 else float("nan"))
    lab = labels[:cfg["n_labels"]] if cfg["n_labels"] else labels
    table6["data"] = dict(
        n=len(lab), label=label_corr(lab, a, b),
        given=[label_corr(lab[lab[:, h] == v], a, b) for v in (0, 1)])

    with np.errstate(invalid="ignore", divide="ignore"):
        data_corr = np.corrcoef(lab.double().numpy().T)
    est = covariance.covariance_from_pairs(
        res["jvp"].double(), res["jvp_pair"].double(), res["rho"].double())
    with np.errstate(invalid="ignore", divide="ignore"):
        mats = {"data": data_corr,
                "paper (JVP)": moment_to_corr(est.upper).numpy(),
                "identity (JVP)": np.asarray(est.corr),
                "samples": np.corrcoef(pred.numpy().T)}
    mae = {k: offdiag_mae(v, data_corr) for k, v in mats.items() if k != "data"}
    mae["zeros"] = offdiag_mae(np.zeros_like(data_corr), data_corr)

    graph = pc_discovery(lab, names, alpha=0.01, test="gsq")
    neighbours = [names[j] for j in range(len(names))
                  if j != h and (graph[h, j] or graph[j, h])]
    return dict(names=names, heavy_makeup=h, pointy_nose=a, rosy_cheeks=b,
                table6=table6, figure5=dict(matrices=mats, mae=mae),
                pc=dict(graph=graph, neighbours=neighbours),
                settings=dict(cfg, config=config, n_images=len(x01),
                              weights=str(weights_path) if weights_path else None),
                probes_meta=res["meta"])
