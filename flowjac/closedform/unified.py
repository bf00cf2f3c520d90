"""One pair of linear equations for diffusion and flow-matching targets.

Every model here writes its noisy input and its regression target as

    x_t = a(t) x0 + b(t) eps,        y = c(t) x0 + d(t) eps,

with data x0 and noise eps ~ N(0, I) independent (the *diffusion* convention:
x0 is data). The matrix M(t) = [[a, b], [c, d]] gives the reverse step
(solve the 2x2 system for (x0_hat, eps_hat), then re-noise), the one-step
data estimate, the amplification dx0_hat/dy = -b / det M of an error in y,
and the per-coordinate Pearson correlation between x_t and y.

The rest of this book uses the flow-matching convention X_0 = noise,
X_1 = data; the model ``fm_book`` states that convention in this table.

Derived in the chapter :ref:`sec_unified`
(``book/unified.md``).

Longer than 400 lines because each model's numeric coefficients are
lambdified from its symbolic definition in the same table; the numeric
and symbolic halves must not drift apart.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import sympy as sp
import torch

from flowjac._checks import check_int, check_number, value_range
from flowjac.closedform.gaussian import check_mean_cov

__all__ = [
    "t", "ModelTable", "ModelSpec", "MODELS", "SPECS", "check_model",
    "check_time", "coefficients", "determinant", "amplification", "pearson",
    "solve", "reverse_step", "reverse_process", "gaussian_optimum",
    "coefficients_expr", "determinant_expr", "amplification_expr",
    "pearson_expr", "pearson_general", "on_range", "logit_normal_pdf",
    "sample_times",
]

#: The time symbol of every expression in ``MODELS``.
t = sp.Symbol("t", positive=True)
_u = sp.Symbol("u", positive=True)

EDM_SIGMA_MIN = sp.Rational(1, 500)   # Karras et al. (2022), Table 1
EDM_SIGMA_MAX = sp.Integer(80)
SIGMA_DATA = sp.Integer(1)            # unit-variance data throughout


def _edm_style_target(c_skip, c_out, a, b):
    """(c, d) of F = (x0 - c_skip x_t) / c_out for x_t = a x0 + b eps."""
    return (sp.simplify((1 - c_skip * a) / c_out),
            sp.simplify(-c_skip * b / c_out))


def _build_models() -> dict:
    th = sp.pi * t / 2
    al, sg = sp.cos(th), sp.sin(th)
    sd = SIGMA_DATA
    # EDM: D = c_skip x + c_out F, with sigma = t.
    edm_skip = sd ** 2 / (t ** 2 + sd ** 2)
    edm_out = t * sd / sp.sqrt(t ** 2 + sd ** 2)
    # Consistency models: the same form, shifted so that f(x, eps_min) = x.
    e = EDM_SIGMA_MIN
    cm_skip = sd ** 2 / ((t - e) ** 2 + sd ** 2)
    cm_out = sd * (t - e) / sp.sqrt(t ** 2 + sd ** 2)
    return {
        "ddpm_eps": (al, sg, sp.Integer(0), sp.Integer(1)),
        "ddpm_x": (al, sg, sp.Integer(1), sp.Integer(0)),
        "v_pred": (al, sg, -sg, al),
        "edm": (sp.Integer(1), t) + _edm_style_target(edm_skip, edm_out, 1, t),
        "consistency": (sp.Integer(1), t)
        + _edm_style_target(cm_skip, cm_out, 1, t),
        "rectified_flow": (1 - t, t, sp.Integer(-1), sp.Integer(1)),
        "trigflow": (sp.cos(t), sp.sin(t), -sp.sin(t), sp.cos(t)),
        "fm_book": (t, 1 - t, sp.Integer(1), sp.Integer(-1)),
    }


class ModelTable(dict):
    """Name -> SymPy (a, b, c, d) in ``t``; :ref:`sec_unified`.

    x_t = a x0 + b eps and y = c x0 + d eps, x0 data, eps ~ N(0, I).
    Time conventions (``SPECS[name]`` holds the ranges):

    - ``ddpm_eps``: DDPM / LDM noise prediction (Ho et al. 2020; Rombach et
      al. 2022), variance preserving, continuous t in [0, 1] with
      alpha_bar(t) = cos^2(pi t / 2) (the cosine schedule of Nichol &
      Dhariwal 2021 without its offset): a = cos(pi t/2), b = sin(pi t/2),
      y = eps.
    - ``ddpm_x``: the same process, data prediction y = x0.
    - ``v_pred``: the same process, v = alpha eps - sigma x0 (Salimans & Ho
      2022).
    - ``edm``: Karras et al. (2022), x_sigma = x0 + sigma eps with
      t = sigma in [0.002, 80]; y is the target of the raw network F in
      D = c_skip x + c_out F with sigma_data = 1, i.e.
      F = (x0 - c_skip x_t) / c_out = (sigma x0 - eps) / sqrt(1 + sigma^2).
    - ``consistency``: Song et al. (2023), the same forward process with
      t in (0.002, 80]; f = c_skip x + c_out F with c_skip = 1 / ((t - 0.002)^2
      + 1), c_out = (t - 0.002) / sqrt(1 + t^2) (sigma_data = 1), and y the
      F that makes f equal the one-step data estimate x0.
    - ``rectified_flow``: Liu et al. (2022), Esser et al. (2024):
      x_t = (1 - t) x0 + t eps, t in [0, 1], y = eps - x0.
    - ``trigflow``: Lu & Song (2024): x_t = cos(t) x0 + sin(t) eps,
      t in [0, pi/2], y = cos(t) eps - sin(t) x0 (sigma_data = 1).
    - ``fm_book``: this book's flow matching, X_t = (1 - t) X_0 + t X_1 with
      X_0 = eps (noise) and X_1 = x0 (data), y = X_1 - X_0, t in [0, 1];
      it is ``rectified_flow`` at time 1 - t with y negated.
    """


@dataclass(frozen=True)
class ModelSpec:
    """Time range and convention of one model; :ref:`sec_unified`."""

    name: str
    t_min: float
    t_max: float
    left_open: bool
    time: str
    target: str

    def range_text(self) -> str:
        """The range as text, e.g. "[0, 1]" or "(0.002, 80]"."""
        left = "(" if self.left_open else "["
        return f"{left}{self.t_min:g}, {self.t_max:g}]"


MODELS = ModelTable(_build_models())

SPECS = {
    "ddpm_eps": ModelSpec("ddpm_eps", 0.0, 1.0, False,
                          "alpha_bar(t) = cos^2(pi t/2)", "eps"),
    "ddpm_x": ModelSpec("ddpm_x", 0.0, 1.0, False,
                        "alpha_bar(t) = cos^2(pi t/2)", "x0"),
    "v_pred": ModelSpec("v_pred", 0.0, 1.0, False,
                        "alpha_bar(t) = cos^2(pi t/2)",
                        "alpha eps - sigma x0"),
    "edm": ModelSpec("edm", float(EDM_SIGMA_MIN), float(EDM_SIGMA_MAX), False,
                     "sigma = t", "F = (x0 - c_skip x_t) / c_out"),
    "consistency": ModelSpec("consistency", float(EDM_SIGMA_MIN),
                             float(EDM_SIGMA_MAX), True, "sigma = t",
                             "F with f = c_skip x_t + c_out F = x0"),
    "rectified_flow": ModelSpec("rectified_flow", 0.0, 1.0, False,
                                "x_t = (1-t) x0 + t eps", "eps - x0"),
    "trigflow": ModelSpec("trigflow", 0.0, math.pi / 2, False,
                          "x_t = cos(t) x0 + sin(t) eps",
                          "cos(t) eps - sin(t) x0"),
    "fm_book": ModelSpec("fm_book", 0.0, 1.0, False,
                         "X_t = (1-t) noise + t data", "data - noise"),
}


def check_model(model: str) -> ModelSpec:
    """Return the spec of ``model`` or raise ValueError listing the names; :ref:`sec_unified`."""
    if not isinstance(model, str) or model not in MODELS:
        raise ValueError(f"model must be one of {tuple(MODELS)}, "
                         f"got {model!r}")
    return SPECS[model]


def check_time(model: str, t, name: str = "t"):
    """Raise ValueError unless every entry of ``t`` lies in the model's range; :ref:`sec_unified`."""
    spec = check_model(model)
    if torch.is_tensor(t) and not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    span = value_range(t, name)
    if span is None:
        return t
    lo, hi = span
    # one part in 1e12 of slack for float round-off at closed ends
    slack = 1e-12 * max(1.0, spec.t_max)
    low_ok = lo > spec.t_min if spec.left_open else lo >= spec.t_min - slack
    if not (low_ok and hi <= spec.t_max + slack):
        raise ValueError(
            f"{name} must lie in {spec.range_text()} for {model!r} "
            f"({spec.time}), got values in [{lo:.6g}, {hi:.6g}]")
    return t


def _as_tensor(t):
    if torch.is_tensor(t):
        return t if t.is_floating_point() else t.to(torch.get_default_dtype())
    return torch.tensor(float(t), dtype=torch.float64)


def _out(value: torch.Tensor, like):
    return value if torch.is_tensor(like) else float(value)


def _coef(model: str, tt: torch.Tensor):
    """Hand-written torch closed forms, checked against the SymPy table."""
    one, zero = torch.ones_like(tt), torch.zeros_like(tt)
    if model in ("ddpm_eps", "ddpm_x", "v_pred"):
        th = 0.5 * math.pi * tt
        al, sg = torch.cos(th), torch.sin(th)
        if model == "ddpm_eps":
            return al, sg, zero, one
        if model == "ddpm_x":
            return al, sg, one, zero
        return al, sg, -sg, al
    if model == "edm":
        r = torch.sqrt(1 + tt ** 2)
        return one, tt, tt / r, -1 / r
    if model == "consistency":
        e = float(EDM_SIGMA_MIN)
        r, h = torch.sqrt(1 + tt ** 2), tt - e
        return one, tt, h * r / (h ** 2 + 1), -tt * r / (h * (h ** 2 + 1))
    if model == "rectified_flow":
        return 1 - tt, tt, -one, one
    if model == "trigflow":
        return torch.cos(tt), torch.sin(tt), -torch.sin(tt), torch.cos(tt)
    return tt, 1 - tt, one, -one          # fm_book


def coefficients(model: str, t):
    """Numeric (a, b, c, d) at ``t`` (float or tensor); :ref:`sec_unified`."""
    check_time(model, t)
    return tuple(_out(v, t) for v in _coef(model, _as_tensor(t)))


def determinant(model: str, t):
    """det M(t) = a d - b c; :ref:`sec_unified`."""
    check_time(model, t)
    a, b, c, d = _coef(model, _as_tensor(t))
    return _out(a * d - b * c, t)


def amplification(model: str, t):
    """dx0_hat/dy = -b / det M (+-inf where M is singular); :ref:`sec_unified`."""
    check_time(model, t)
    a, b, c, d = _coef(model, _as_tensor(t))
    return _out(-b / (a * d - b * c), t)


def _check_var(data_var):
    if torch.is_tensor(data_var):
        bad = (~torch.isfinite(data_var)) | (data_var < 0)
        if data_var.numel() and bool(bad.any()):
            raise ValueError("data_var must be finite and >= 0")
        return data_var if data_var.is_floating_point() else \
            data_var.to(torch.get_default_dtype())
    try:
        v = float(data_var)
    except (TypeError, ValueError):
        raise ValueError(f"data_var must be a number or tensor >= 0, got "
                         f"{data_var!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"data_var must be finite and >= 0, got {v}")
    return v


def pearson(model: str, t, data_var=1.0):
    """Corr(x_t, y) per coordinate, (a c s2 + b d)/sqrt((a^2 s2 + b^2)(c^2 s2 + d^2)); :ref:`sec_unified`.

    ``data_var`` is Var(x0) per coordinate (float or tensor broadcasting with
    ``t``); the result is NaN where x_t or y has zero variance.
    """
    check_time(model, t)
    s2 = _check_var(data_var)
    tt = _as_tensor(t)
    if torch.is_tensor(s2):
        tt, s2 = torch.broadcast_tensors(tt.to(s2.dtype), s2)
    a, b, c, d = _coef(model, tt)
    rho = (a * c * s2 + b * d) / torch.sqrt(
        (a ** 2 * s2 + b ** 2) * (c ** 2 * s2 + d ** 2))
    return rho if (torch.is_tensor(t) or torch.is_tensor(data_var)) \
        else float(rho)


def _scalar_time(model, t, name):
    check_time(model, t, name)
    if torch.is_tensor(t) and t.numel() != 1:
        raise ValueError(f"{name} must be a scalar (a float or a one-element "
                         f"tensor), got shape {tuple(t.shape)}")
    return float(t)


def solve(model: str, x_t: torch.Tensor, y: torch.Tensor, t):
    """(x0_hat, eps_hat) = M(t)^{-1} (x_t, y); :ref:`sec_unified`."""
    tf = _scalar_time(model, t, "t")
    if not (torch.is_tensor(x_t) and torch.is_tensor(y)):
        raise ValueError("x_t and y must be torch tensors")
    if x_t.shape != y.shape:
        raise ValueError(f"x_t and y must have the same shape, got "
                         f"{tuple(x_t.shape)} and {tuple(y.shape)}")
    a, b, c, d = (float(v) for v in _coef(model, _as_tensor(tf)))
    det = a * d - b * c
    if abs(det) < 1e-12:
        raise ValueError(f"t = {tf:g} makes M(t) singular for {model!r} "
                         f"(det M = {det:.3g}); x0 and eps cannot be "
                         "recovered there")
    return (d * x_t - b * y) / det, (a * y - c * x_t) / det


def reverse_step(model: str, x_t: torch.Tensor, y: torch.Tensor, t, s):
    """x_s = a(s) x0_hat + b(s) eps_hat from the 2x2 solve at t; :ref:`sec_unified`."""
    sf = _scalar_time(model, s, "s")
    x0_hat, eps_hat = solve(model, x_t, y, t)
    a, b, _, _ = (float(v) for v in _coef(model, _as_tensor(sf)))
    return a * x0_hat + b * eps_hat


def reverse_process(model: str, predictor, x_start: torch.Tensor, times):
    """Deterministic sampler: reverse_step along ``times``, returns the path; :ref:`sec_unified`.

    ``predictor(x, t)`` returns the model's target y at (x, t); the path
    has shape ``(len(times), *x_start.shape)``.
    """
    times = [float(v) for v in times]
    if len(times) < 2:
        raise ValueError(f"times must hold at least 2 points, got "
                         f"{len(times)}")
    check_time(model, torch.tensor(times, dtype=torch.float64), "times")
    if not callable(predictor):
        raise ValueError("predictor must be callable as predictor(x, t)")
    path, x = [x_start], x_start
    for t_now, t_next in zip(times[:-1], times[1:]):
        x = reverse_step(model, x, predictor(x, t_now), t_now, t_next)
        path.append(x)
    return torch.stack(path)


def gaussian_optimum(model: str, x_t: torch.Tensor, t, mean, cov):
    """E[y | x_t] for data N(mean, cov) by Gaussian conditioning; :ref:`sec_unified`.

    y_hat = c mean + Q diag((a c lam + b d)/(a^2 lam + b^2)) Q^T (x_t - a mean)
    with cov = Q diag(lam) Q^T (pseudo-inverse where a^2 lam + b^2 = 0).
    """
    tf = _scalar_time(model, t, "t")
    mean, cov = check_mean_cov(mean, cov)
    if not torch.is_tensor(x_t) or x_t.ndim < 1 or \
            x_t.shape[-1] != cov.shape[0]:
        raise ValueError(f"x_t must be a tensor of shape (..., "
                         f"{cov.shape[0]}) to match cov")
    mean, cov = mean.to(x_t), cov.to(x_t)
    a, b, c, d = (float(v) for v in _coef(model, _as_tensor(tf)))
    lam, q = torch.linalg.eigh(0.5 * (cov + cov.T))
    lam = lam.clamp_min(0.0)
    den = a ** 2 * lam + b ** 2
    gain = torch.where(den > 0, (a * c * lam + b * d)
                       / torch.where(den > 0, den, torch.ones_like(den)),
                       torch.zeros_like(den))
    return c * mean + ((x_t - a * mean) @ q * gain) @ q.T


# ---------------------------------------------------------------- symbolic

def coefficients_expr(model: str):
    """SymPy (a, b, c, d) in ``t``; :ref:`sec_unified`."""
    check_model(model)
    return MODELS[model]


def _shifted(model):
    """(a, b, c, d) with t = t_min + u (u > 0) when the range is left-open."""
    spec = check_model(model)
    coef = MODELS[model]
    if not spec.left_open:
        return coef, None
    lo = sp.nsimplify(spec.t_min)
    return tuple(sp.sympify(e).subs(t, lo + _u) for e in coef), lo


def _unshift(expr, lo):
    return expr if lo is None else expr.subs(_u, t - lo)


def on_range(expr, model: str):
    """Rewrite ``expr`` in u = t - t_min > 0 on a left-open range, so simplify sees t > t_min; :ref:`sec_unified`."""
    spec = check_model(model)
    if not spec.left_open:
        return expr
    return sp.sympify(expr).subs(t, sp.nsimplify(spec.t_min) + _u)


def determinant_expr(model: str):
    """SymPy det M(t) = a d - b c; :ref:`sec_unified`."""
    (a, b, c, d), lo = _shifted(model)
    return _unshift(sp.simplify(a * d - b * c), lo)


def amplification_expr(model: str):
    """SymPy dx0_hat/dy = -b / det M(t); :ref:`sec_unified`."""
    (a, b, c, d), lo = _shifted(model)
    return _unshift(sp.simplify(-b / (a * d - b * c)), lo)


def pearson_expr(model: str, data_var=1):
    """SymPy Corr(x_t, y) for Var(x0) = ``data_var`` (a number or a symbol); :ref:`sec_unified`."""
    (a, b, c, d), lo = _shifted(model)
    s2 = sp.sympify(data_var)
    num = sp.factor(a * c * s2 + b * d)
    if num == 0:
        return sp.Integer(0)
    den = (sp.sqrt(sp.factor(a ** 2 * s2 + b ** 2))
           * sp.sqrt(sp.factor(c ** 2 * s2 + d ** 2)))
    return _unshift(sp.simplify(num / den), lo)


def pearson_general():
    """Corr(a x0 + b eps, c x0 + d eps) from the moment algebra, as a dict; :ref:`sec_unified`.

    Expands the products in x0 and eps and takes expectations with
    E x0 = E eps = E[x0 eps] = 0, E x0^2 = sigma^2, E eps^2 = 1.
    """
    a, b, c, d = sp.symbols("a b c d", real=True)
    s2 = sp.Symbol("sigma^2", positive=True)
    x0, ep = sp.symbols("x_0 epsilon", real=True)
    moments = {(0, 0): 1, (1, 0): 0, (0, 1): 0, (1, 1): 0, (2, 0): s2,
               (0, 2): 1}

    def expect(expr):
        poly = sp.Poly(sp.expand(expr), x0, ep)
        return sp.Add(*[coef * moments[m] for m, coef in poly.terms()])

    xt, y = a * x0 + b * ep, c * x0 + d * ep
    cov, vx, vy = expect(xt * y), expect(xt ** 2), expect(y ** 2)
    return {"symbols": (a, b, c, d, s2), "cov": cov, "var_x": vx,
            "var_y": vy, "rho": cov / sp.sqrt(vx * vy)}


# ------------------------------------------------------------ time density

def logit_normal_pdf(t, loc: float = 0.0, scale: float = 1.0):
    """Density of sigmoid(N(loc, scale^2)) on (0, 1) (SD3's t-sampling); :ref:`sec_unified`."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be > 0, got {scale}")
    if not math.isfinite(loc):
        raise ValueError(f"loc must be finite, got {loc}")
    tt = _as_tensor(t)
    if tt.numel() and (float(tt.min()) < 0 or float(tt.max()) > 1):
        raise ValueError("t must lie in [0, 1] for the logit-normal density")
    inside = (tt > 0) & (tt < 1)
    ts = torch.where(inside, tt, torch.full_like(tt, 0.5))
    z = (torch.log(ts / (1 - ts)) - loc) / scale
    p = torch.exp(-0.5 * z ** 2) / (scale * math.sqrt(2 * math.pi)
                                    * ts * (1 - ts))
    return _out(torch.where(inside, p, torch.zeros_like(p)), t)


def sample_times(n: int, kind: str = "uniform", loc: float = 0.0,
                 scale: float = 1.0, generator=None,
                 dtype=torch.float64) -> torch.Tensor:
    """n training times in (0, 1): "uniform" or "logit_normal"; :ref:`sec_unified`."""
    n = check_int("n", n, minimum=1)
    loc = check_number("loc", loc)
    scale = check_number("scale", scale, minimum=0, strict_min=True)
    if kind == "uniform":
        return torch.rand(n, generator=generator, dtype=dtype)
    if kind == "logit_normal":
        z = torch.randn(n, generator=generator, dtype=dtype)
        return torch.sigmoid(loc + scale * z)
    raise ValueError(f"kind must be one of ('uniform', 'logit_normal'), "
                     f"got {kind!r}")
