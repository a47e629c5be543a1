"""FFN activations: one registry, each entry with its forward and its derivative.

Plain activations map the gate pre-activation ``g`` to ``h = f(g)``.
Gated activations combine the gate and up pre-activations::

    h = a(g) * b(u)          # a, b plain activations (b = identity for GLU variants)

    swiglu = silu(g) * u                  Shazeer 2020, "GLU Variants Improve Transformer"
    geglu  = gelu(g) * u                  (geglu_tanh: Gemma's tanh approximation)
    reglu  = relu(g) * u                  ReLUfication target (Mirzadeh et al. 2023)
    drelu  = relu(g) * relu(u)            TurboSparse (Song et al. 2024), eq. 2
    relu2glu = relu(g)**2 * u             squared-ReLU gate (ReLU^2 Wins, Zhang et al. 2024)

The ReLU family outputs *exact* zeros, which is what the sparse kernels skip. A threshold
turns relu into FATReLU, ``x if x >= t else 0`` (Kurtz et al. 2020; ProSparse, Song et al.
2024, applies it after L1 training): write it after a colon,
``"fatrelu:0.05"``, ``"reglu:0.05"`` or ``"drelu:0.05"``; the threshold applies to every
ReLU of the activation.

Names are case-insensitive. Register your own with :func:`register_activation` and
:func:`register_gated`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import numpy as np

Array = np.ndarray

_SQRT_2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _erf(x: Array) -> Array:
    """Error function, elementwise, in the dtype of ``x`` (NumPy has no ``erf``).

    W. J. Cody's rational Chebyshev approximations on three ranges, evaluated in float64:
    max error ~2e-16 against ``math.erf`` (checked in the tests).
    """
    if not hasattr(x, "astype"):          # Python numbers; NumPy and CuPy arrays pass through
        x = np.asarray(x)
    xd = x.astype(np.float64, copy=False)
    ax = np.abs(xd)
    out = np.empty_like(xd)
    # |x| < 0.5: erf(x) = x * P(x^2)/Q(x^2)
    m1 = ax < 0.5
    if m1.any():
        z = xd[m1] ** 2
        p = ((((1.85777706184603153e-1 * z + 3.16112374387056560e0) * z + 1.13864154151050156e2) * z
              + 3.77485237685302021e2) * z + 3.20937758913846947e3)
        q = (((z + 2.36012909523441209e1) * z + 2.44024637934444173e2) * z
             + 1.28261652607737228e3) * z + 2.84423683343917062e3
        out[m1] = xd[m1] * p / q
    # 0.5 <= |x| < 4: erfc via P/Q in |x|
    m2 = (ax >= 0.5) & (ax < 4.0)
    if m2.any():
        y = ax[m2]
        p = ((((((((2.15311535474403846e-8 * y + 5.64188496988670089e-1) * y + 8.88314979438837594e0) * y
                  + 6.61191906371416295e1) * y + 2.98635138197400131e2) * y + 8.81952221241769090e2) * y
               + 1.71204761263407058e3) * y + 2.05107837782607147e3) * y + 1.23033935479799725e3)
        q = ((((((((y + 1.57449261107098347e1) * y + 1.17693950891312499e2) * y + 5.37181101862009858e2) * y
                 + 1.62138957456669019e3) * y + 3.29079923573345963e3) * y + 4.36261909014324716e3) * y
              + 3.43936767414372164e3) * y + 1.23033935480374942e3)
        erfc = np.exp(-y * y) * p / q
        out[m2] = np.sign(xd[m2]) * (1.0 - erfc)
    # |x| >= 4: erfc tiny
    m3 = ax >= 4.0
    if m3.any():
        y = ax[m3]
        z = 1.0 / (y * y)
        p = (((((1.63153871373020978e-2 * z + 3.05326634961232344e-1) * z + 3.60344899949804439e-1) * z
               + 1.25781726111229246e-1) * z + 1.60837851487422766e-2) * z + 6.58749161529837803e-4)
        q = ((((z + 2.56852019228982242e0) * z + 1.87295284992346725e0) * z + 5.27905102951428412e-1) * z
             + 6.05183413124413191e-2) * z + 2.33520497626869185e-3
        r = (1.0 / math.sqrt(math.pi) - z * p / q) / y
        out[m3] = np.sign(xd[m3]) * (1.0 - np.exp(-y * y) * r)
    return out.astype(x.dtype, copy=False)


# --------------------------------------------------------------------------------------
# plain activations: f(x) and f'(x)
# --------------------------------------------------------------------------------------
def relu(x: Array) -> Array:
    """ReLU, ``max(x, 0)``: exactly 0 for every x <= 0, elementwise, same shape and dtype."""
    return np.maximum(x, 0)


def relu_grad(x: Array) -> Array:
    """d relu / dx = 1 where x > 0, else 0 (at exactly 0: 0, PyTorch's choice)."""
    return (x > 0).astype(x.dtype)  # derivative at exactly 0 taken as 0 (PyTorch's choice)


def identity(x: Array) -> Array:
    """f(x) = x (the "up" branch of GLU variants)."""
    return x


def identity_grad(x: Array) -> Array:
    """d identity / dx = 1."""
    return np.ones_like(x)


def silu(x: Array) -> Array:
    """SiLU / swish, ``x * sigmoid(x)`` (the gate of SwiGLU): small but non-zero for x < 0.

    Examples
    --------
    >>> import numpy as np
    >>> float(silu(np.float64(-1.0)))   # -1 * sigmoid(-1)
    -0.2689414213699951
    """
    # x * sigmoid(x), written to avoid overflow of exp(-x) for very negative x
    return x * _sigmoid(x)


def _sigmoid(x: Array) -> Array:
    # 1 / (1 + exp(-x)): for very negative x, exp(-x) overflows to inf and the result is
    # 0, the right limit (the overflow warning is silenced). Four passes over x, no
    # np.where: this is on the training hot path of SwiGLU (forward and backward).
    with np.errstate(over="ignore"):
        e = np.exp(-x)
    e += 1
    if getattr(e, "ndim", 0) == 0:       # a scalar in, a scalar out (no out= buffer)
        return np.reciprocal(e)
    return np.reciprocal(e, out=e)


def silu_grad(x: Array) -> Array:
    """d silu / dx = s (1 + x (1 - s)), s = sigmoid(x)."""
    s = _sigmoid(x)
    return s * (1 + x * (1 - s))


def gelu(x: Array) -> Array:
    """Exact GELU: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))."""
    return 0.5 * x * (1.0 + _erf(x / _SQRT_2))


def gelu_grad(x: Array) -> Array:
    """d gelu / dx = Phi(x) + x phi(x) (phi the standard normal density)."""
    phi = np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return 0.5 * (1.0 + _erf(x / _SQRT_2)) + x * phi


def gelu_tanh(x: Array) -> Array:
    """tanh approximation of GELU (GPT-2, Gemma's ``gelu_pytorch_tanh``)."""
    return 0.5 * x * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)))


def gelu_tanh_grad(x: Array) -> Array:
    """Derivative of :func:`gelu_tanh`."""
    inner = _SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)
    t = np.tanh(inner)
    dinner = _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * dinner


def relu2(x: Array) -> Array:
    """Squared ReLU (Primer, So et al. 2021; ReLU^2 Wins, Zhang et al. 2024)."""
    r = np.maximum(x, 0)
    return r * r


def relu2_grad(x: Array) -> Array:
    """d relu(x)^2 / dx = 2 max(x, 0)."""
    return 2 * np.maximum(x, 0)


def make_fatrelu(threshold: float):
    """FATReLU(x) = x if x >= threshold else 0 (Kurtz et al. 2020, "Inducing and exploiting
    activation sparsity for fast inference on deep neural networks"; used again by
    ProSparse, Song et al. 2024, after its L1 stage).

    Returns the pair ``(f, df)``: the function and its derivative (1 from the threshold up,
    0 below). With threshold 0 it is plain ReLU (x > 0). Registry names with a threshold,
    ``"fatrelu:0.05"``, ``"drelu:0.05"``, build activations from it.

    Examples
    --------
    >>> import numpy as np
    >>> f, df = make_fatrelu(0.1)
    >>> f(np.array([-1.0, 0.05, 0.5]))
    array([0. , 0. , 0.5])
    """
    t = float(threshold)

    def keep(x: Array) -> Array:
        return x >= t if t > 0 else x > 0

    def fatrelu(x: Array) -> Array:
        return np.where(keep(x), x, 0).astype(x.dtype, copy=False)

    def fatrelu_grad(x: Array) -> Array:
        return keep(x).astype(x.dtype)

    return fatrelu, fatrelu_grad


@dataclass(frozen=True)
class Activation:
    """A registry entry: an FFN activation with its forward and its derivative.

    ``gated=False``: ``h = gate_fn(g)``. ``gated=True``: ``h = gate_fn(g) * up_fn(u)``,
    where ``g = x @ w_gate.T`` and ``u = x @ w_up.T`` are (N, F) pre-activations.
    ``exact_zeros`` says whether ``h == 0`` is *decided by the gate alone* for most inputs
    (the ReLU family); the sparse kernels skip neurons only then (or under a threshold).

    Attributes
    ----------
    name : str
        Registry name, lower case (with ``":t"`` for a FATReLU threshold t).
    gated : bool
        Whether the activation takes an up projection too.
    gate_fn, gate_grad, up_fn, up_grad : callable
        Elementwise functions and derivatives of the two branches.
    exact_zeros : bool
        True for the ReLU family (relu, relu2, fatrelu, reglu, drelu, relu2glu).
    gate_kind, up_kind : str
        What the kernels compile: ``"relu"``, ``"relu2"``, ``"silu"``, ``"gelu"``,
        ``"gelu_tanh"``, ``"identity"`` or ``"other"``; ``up_kind`` is ``"relu"`` for dReLU.
    threshold : float
        FATReLU threshold of the ReLUs (0 = plain ReLU).

    Examples
    --------
    >>> import numpy as np
    >>> act = get_activation("drelu")
    >>> act(np.array([1.0, -1.0, 2.0]), np.array([3.0, 5.0, -1.0]))    # relu(g) * relu(u)
    array([3., 0., 0.])
    >>> act.gated, act.exact_zeros, act.gate_kind, act.up_kind
    (True, True, 'relu', 'relu')
    """

    name: str
    gated: bool
    gate_fn: Callable[[Array], Array]
    gate_grad: Callable[[Array], Array]
    up_fn: Callable[[Array], Array] = identity
    up_grad: Callable[[Array], Array] = identity_grad
    exact_zeros: bool = False
    gate_kind: str = "other"   # relu | relu2 | silu | gelu | gelu_tanh | identity | other (kernels)
    up_kind: str = "identity"
    threshold: float = 0.0     # FATReLU threshold of the ReLUs in this activation

    # -- forward / backward --------------------------------------------------------------
    def forward(self, g: Array, u: Optional[Array] = None) -> Array:
        """h from the gate pre-activation g (and the up pre-activation u when gated).

        g, u : (..., F) float arrays of the same shape; returns h of that shape and dtype.
        """
        if not self.gated:
            return self.gate_fn(g)
        if u is None:
            raise ValueError(f"activation {self.name!r} is gated: pass both g and u")
        return self.gate_fn(g) * self.up_fn(u)

    def backward(self, dh: Array, g: Array, u: Optional[Array] = None):
        """Given dL/dh, return ``(dL/dg, dL/du)`` (``dL/du`` is None when not gated).

        dh, g, u : (..., F) arrays of one shape (g, u: the forward's inputs).
        """
        if not self.gated:
            return dh * self.gate_grad(g), None
        a, b = self.gate_fn(g), self.up_fn(u)
        return dh * b * self.gate_grad(g), dh * a * self.up_grad(u)

    def __call__(self, g: Array, u: Optional[Array] = None) -> Array:
        return self.forward(g, u)


_REGISTRY: Dict[str, Activation] = {}
_PLAIN: Dict[str, tuple] = {}  # name -> (f, df, kind)


def register_activation(name: str, f: Callable, df: Callable, *, exact_zeros: bool = False,
                        overwrite: bool = False) -> Activation:
    """Register a plain activation ``h = f(g)`` with derivative ``df``.

    Parameters
    ----------
    name : str
        Case-insensitive; then usable in ``ModelConfig(activation=name)`` and as a part
        of :func:`register_gated`.
    f, df : callable
        Elementwise function and its derivative (array in, array of the same shape out).
    exact_zeros : bool
        Declare that f outputs exact zeros (the kernels only skip neurons of activations
        whose gate kind they know, so a custom one is computed densely anyway).
    overwrite : bool
        Replace an existing entry of that name.

    Returns
    -------
    Activation

    Examples
    --------
    >>> import numpy as np
    >>> act = register_activation("softplus_demo", lambda x: np.logaddexp(0, x),
    ...                           lambda x: 1 / (1 + np.exp(-x)), overwrite=True)
    >>> act.gated
    False
    """
    key = name.lower()
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"activation {name!r} is already registered (pass overwrite=True to replace it)")
    _PLAIN[key] = (f, df, "other")
    act = Activation(key, False, f, df, exact_zeros=exact_zeros)
    _REGISTRY[key] = act
    return act


def register_gated(name: str, gate: str, up: str = "identity", *, overwrite: bool = False) -> Activation:
    """Register a gated activation ``h = gate(g) * up(u)`` from two registered plain names.

    dReLU is ``register_gated("drelu", "relu", "relu")`` (TurboSparse, Song et al. 2024);
    SwiGLU is ``register_gated("swiglu", "silu")`` (Shazeer 2020).

    Parameters
    ----------
    name : str
        Case-insensitive name of the new activation.
    gate, up : str
        Registered plain activations applied to the gate and the up pre-activation.
    overwrite : bool
        Replace an existing entry of that name.

    Returns
    -------
    Activation

    Examples
    --------
    >>> register_gated("silu_relu_demo", "silu", "relu", overwrite=True).name
    'silu_relu_demo'
    """
    key = name.lower()
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"activation {name!r} is already registered (pass overwrite=True to replace it)")
    for part in (gate, up):
        if part.lower() not in _PLAIN:
            raise KeyError(f"unknown plain activation {part!r}; known: {sorted(_PLAIN)}")
    gf, gd, gk = _PLAIN[gate.lower()]
    uf, ud, uk = _PLAIN[up.lower()]
    exact = gk in ("relu", "relu2")
    act = Activation(key, True, gf, gd, uf, ud, exact_zeros=exact, gate_kind=gk, up_kind=uk)
    _REGISTRY[key] = act
    return act


def _builtin_plain(name: str, f, df, kind: str, exact: bool) -> None:
    _PLAIN[name] = (f, df, kind)
    _REGISTRY[name] = Activation(name, False, f, df, exact_zeros=exact, gate_kind=kind)


_builtin_plain("identity", identity, identity_grad, "identity", False)
_builtin_plain("relu", relu, relu_grad, "relu", True)
_builtin_plain("relu2", relu2, relu2_grad, "relu2", True)
_builtin_plain("silu", silu, silu_grad, "silu", False)
_builtin_plain("gelu", gelu, gelu_grad, "gelu", False)
_builtin_plain("gelu_tanh", gelu_tanh, gelu_tanh_grad, "gelu_tanh", False)
_builtin_plain("fatrelu", relu, relu_grad, "relu", True)  # threshold 0 unless "fatrelu:t"
for _name, _gate, _up in (("swiglu", "silu", "identity"), ("geglu", "gelu", "identity"),
                          ("geglu_tanh", "gelu_tanh", "identity"), ("reglu", "relu", "identity"),
                          ("drelu", "relu", "relu"), ("relu2glu", "relu2", "identity")):
    register_gated(_name, _gate, _up)

# aliases (Hugging Face ``hidden_act`` spellings map here too)
_ALIASES = {"swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
            "squared_relu": "relu2", "dual_relu": "drelu"}


def _fmt_number(x: float) -> str:
    """Short text of ``x`` that reads back as the same float ("0.05", "1e-05")."""
    g = f"{x:g}"
    return g if float(g) == x else repr(float(x))


def _with_threshold(act: Activation, t: float) -> Activation:
    """The same activation with every ReLU replaced by FATReLU(threshold t)."""
    if act.gate_kind != "relu":
        raise ValueError(f"a threshold ':{t}' only applies to ReLU-gated activations "
                         f"(relu, fatrelu, reglu, drelu), not {act.name!r}")
    f, df = make_fatrelu(t)
    up_fn, up_grad = (f, df) if act.up_kind == "relu" else (act.up_fn, act.up_grad)
    return Activation(f"{act.name}:{_fmt_number(t)}", act.gated, f, df, up_fn, up_grad, exact_zeros=True,
                      gate_kind="relu", up_kind=act.up_kind, threshold=t)


# --------------------------------------------------------------------------------------
# shifted ReLU (Mirzadeh et al. 2023, stage 2): "drelu_shift:0.05", "reglu_shift:0.05:0.01"
# --------------------------------------------------------------------------------------
SHIFT_SUFFIX = "_shift"
_SHIFTABLE = ("relu", "relu2", "reglu", "drelu", "relu2glu")
# names written by relufy before the parameterised form: "drelu-shift0.05", "reglu-shift0.5-t0.6"
_LEGACY_SHIFT = re.compile(r"^(?P<base>[a-z0-9_]+)-shift(?P<b>[-+0-9.e]+?)(?:-t(?P<t>[-+0-9.e]+))?$")


def make_shifted_relu(kind: str, shift: float, threshold: float = 0.0):
    """``(f, df)`` of ``relu(z - shift)`` (kept only above ``threshold``) or ``relu(z - shift)**2``.

    ``kind`` is ``"relu"`` or ``"relu2"`` (squared ReLU takes no threshold).

    >>> import numpy as np
    >>> f, df = make_shifted_relu("relu", 0.5)
    >>> f(np.array([1.0, 0.2])).tolist(), df(np.array([1.0, 0.2])).tolist()
    ([0.5, 0.0], [1.0, 0.0])
    """
    b, t = float(shift), float(threshold)
    if kind == "relu":
        def f(z: Array) -> Array:
            s = z - np.asarray(b, dtype=z.dtype)
            return np.where(s >= t if t > 0 else s > 0, s, 0).astype(z.dtype, copy=False)  # FATReLU: >= t

        def df(z: Array) -> Array:
            s = z - np.asarray(b, dtype=z.dtype)
            return (s >= t if t > 0 else s > 0).astype(z.dtype)
        return f, df
    if kind == "relu2":
        if t:
            raise ValueError("a FATReLU threshold is not defined for squared ReLU (relu2 / relu2glu)")

        def f2(z: Array) -> Array:
            r = np.maximum(z - np.asarray(b, dtype=z.dtype), 0)
            return r * r

        def df2(z: Array) -> Array:
            return 2 * np.maximum(z - np.asarray(b, dtype=z.dtype), 0)
        return f2, df2
    raise ValueError(f"a shift applies to ReLU-family activations only, not gate kind {kind!r}")


def shifted_name(base: str, shift: float, threshold: float = 0.0) -> str:
    """The registry name of ``base`` with shifted ReLUs: ``shifted_name("drelu", 0.05)`` is
    ``"drelu_shift:0.05"``; with a FATReLU threshold t, ``"drelu_shift:0.05:t"``."""
    name = f"{base}{SHIFT_SUFFIX}:{_fmt_number(float(shift))}"
    return name + (f":{_fmt_number(float(threshold))}" if threshold else "")


def _shifted(base: str, b: float, t: float) -> Activation:
    """``base`` (a ReLU-family name) with every ReLU replaced by ``relu(z - b)`` (> t).

    Its kernels' gate kind is ``"other"`` (the neuron-skipping backends know plain ReLUs
    only and compute it densely); plain shifted ReLUs keep ``exact_zeros=True``.
    """
    if base not in _SHIFTABLE:
        raise ValueError(f"a shift applies to ReLU-family activations ({', '.join(_SHIFTABLE)}), not {base!r}")
    act = _REGISTRY[base]
    f, df = make_shifted_relu(act.gate_kind, b, t)
    name = shifted_name(base, b, t)
    if not act.gated:
        return Activation(name, False, f, df, exact_zeros=True)
    up_fn, up_grad, up_kind = (f, df, "other") if act.up_kind == "relu" else (identity, identity_grad, "identity")
    return Activation(name, True, f, df, up_fn, up_grad, exact_zeros=False, gate_kind="other", up_kind=up_kind)


def _number(name: str, what: str, text: str, minimum: Optional[float] = None) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"bad {what} in activation {name!r}: {text!r} is not a number") from None
    if not math.isfinite(v):
        raise ValueError(f"the {what} in activation {name!r} must be a finite number, got {text!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"the {what} in activation {name!r} must be >= {minimum:g}, got {text!r}")
    return v


_PARAMETERISED: Dict[str, Activation] = {}    # "drelu:0.05", "drelu_shift:0.1" -> built once


def _parameterised(name: str, key: str, args: list) -> Activation:
    """An activation with parameters after colons: a FATReLU threshold, or a shift (+ threshold)."""
    if key.endswith(SHIFT_SUFFIX):
        base = _ALIASES.get(key[:-len(SHIFT_SUFFIX)], key[:-len(SHIFT_SUFFIX)])
        if not 1 <= len(args) <= 2:
            raise ValueError(f"activation {name!r}: a shifted ReLU takes a shift and optionally a threshold, "
                             f"e.g. '{base}_shift:0.05' or '{base}_shift:0.05:0.01'")
        b = _number(name, "shift", args[0])
        t = _number(name, "threshold", args[1], 0.0) if len(args) == 2 else 0.0
        return _shifted(base, b, t)
    if len(args) != 1:
        raise ValueError(f"activation {name!r}: give one FATReLU threshold after the colon, e.g. 'drelu:0.05'")
    t = _number(name, "threshold", args[0], 0.0)
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise KeyError(f"unknown activation {name!r}; known: {', '.join(list_activations())}")
    return _REGISTRY[key] if t == 0.0 else _with_threshold(_REGISTRY[key], t)


def get_activation(name) -> Activation:
    """Look an activation up by (case-insensitive) name, e.g. ``"SwiGLU"``, ``"drelu:0.05"``.

    Parameters
    ----------
    name : str or Activation
        A registry name, a Hugging Face ``hidden_act`` alias (``"gelu_pytorch_tanh"``,
        ``"swish"``...), optionally with a FATReLU threshold after a colon
        (``"reglu:0.05"``: every ReLU becomes ``x if x > 0.05 else 0``; ProSparse), or a
        shifted ReLU-family activation ``"<base>_shift:<b>"`` (every ReLU becomes
        ``relu(z - b)``; Mirzadeh et al. 2023), optionally with a threshold,
        ``"drelu_shift:0.05:0.01"``. The older spelling ``"drelu-shift0.05"`` is read too.
        An :class:`Activation` is returned as it is.

    Returns
    -------
    Activation

    Raises
    ------
    KeyError
        The name is unknown (the message lists the known ones).
    ValueError
        A parameter is malformed, not finite, negative (thresholds), or given to an
        activation it does not apply to.

    Examples
    --------
    >>> get_activation("SwiGLU").name
    'swiglu'
    >>> get_activation("drelu:0.05").threshold
    0.05
    >>> get_activation("drelu_shift:0.1").name
    'drelu_shift:0.1'
    """
    if isinstance(name, Activation):
        return name
    if not isinstance(name, str):
        raise TypeError(f"activation must be a name (str), got {type(name).__name__}")
    key = name.strip().lower()
    legacy = _LEGACY_SHIFT.match(key)
    if legacy is not None and key not in _REGISTRY:
        key = shifted_name(legacy["base"], _number(name, "shift", legacy["b"]),
                           _number(name, "threshold", legacy["t"] or "0", 0.0))
    if ":" not in key:
        key = _ALIASES.get(key, key)
        if key not in _REGISTRY:
            raise KeyError(f"unknown activation {name!r}; known: {', '.join(list_activations())}")
        return _REGISTRY[key]
    if key not in _PARAMETERISED:
        base, *args = key.split(":")
        act = _parameterised(name, base, args)
        _PARAMETERISED[key] = act
        _PARAMETERISED.setdefault(act.name, act)
    return _PARAMETERISED[key]


def list_activations(gated: Optional[bool] = None) -> list:
    """Registered names (optionally only gated or only plain ones), sorted.

    Examples
    --------
    >>> "drelu" in list_activations(gated=True), "relu" in list_activations(gated=False)
    (True, True)
    """
    return sorted(k for k, a in _REGISTRY.items() if gated is None or a.gated == gated)
