r"""Gradient-aware row scores: predict ``‖dY_i‖`` in forward, learn it from backward.

The CRS estimate of ``dW = Σ_i dY_iᵀ X_i`` has least variance at ``p_i ∝ ‖X_i‖·‖dY_i‖``, but the
rows must be chosen in forward, before ``dY`` exists. Norm-only scores (``p_i ∝ ‖X_i‖``) spend
draws on rows whose gradient is zero: padding, ignored labels, every row but ``[CLS]`` after a
classifier's last attention. This module predicts ``‖dY_i‖`` from what forward knows about a row
and learns the prediction online from the ``dY`` row norms each backward sees, per sampled weight.

**Cells.** Row ``i`` of an input flattened to ``(N, D)``, ``N = B·T``, sits at position ``t_i`` of
its sequence; where the graph has an ``attention_mask`` (and/or ``labels``) of shape ``(B, T)``,
``pad_i = [mask_i = 0]`` and ``ign_i = [label_i = -100]``. Its cell is

.. math::  c_i = 4·\min(t_i, P − 1) + 2·pad_i + ign_i,   \qquad P = ``NUM_POSITIONS``.

**Learning** (backward, per weight, no host sync; :func:`learning_state` says how). With ``r_i = ‖G_i‖`` the row norms of
``G = dY`` and ``r̄`` their mean, each cell seen this step gets the mean relative norm of its rows,
``o_c = mean_{i∈c} r_i / r̄``, into an exponential average with bias correction (Adam's):

.. math::  m_c ← β m_c + (1−β) o_c, \quad n_c ← n_c + 1, \qquad ĝ_c = m_c / (1 − β^{n_c}).

A step that says nothing about the rows' relative sizes — ``dY`` all zero (a LoRA ``B`` still at
zero), non-finite (an fp16 overflow ``GradScaler`` will skip), or no rows — leaves the state as it
was. The weight's scale ``s`` (an average of ``r̄``) is kept the same way. Cells never seen predict
``1`` (an average row). A cell is *known zero* once it has been seen ``MIN_ZERO_OBSERVATIONS``
times and its average is exactly ``0``: no row seen there ever had a gradient (or none for the
~1000 steps it takes ``β^n`` to underflow).

**Scores** (forward). A sample shared by the linears ``j`` that read one input (q/k/v) serves all
their estimates, whose variances add: ``ĝ_i = (Σ_j (s_j/\max_j s_j)² ĝ_{j,c_i}²)^{1/2}``, known
zero where every member knows it. Relative to ``ḡ``, the mean of ``ĝ`` over the rows not known
zero (scale-free: no underflow however small the gradients),

.. math::  w_i = \max(ĝ_i / ḡ, α) \text{ (not known zero)}, \qquad w_i = ε \text{ (known zero)},
           \qquad \text{score}_i = ‖X_i‖ · w_i .

**Still unbiased.** Every row with ``X_i ≠ 0`` keeps ``p_i > 0`` (``w_i ≥ ε > 0``), so the
estimator of :mod:`wtacompile.estimator` stays unbiased whatever the prediction; a wrong one costs
variance, never bias. The floor ``α`` bounds that cost for rows the predictor under-rates (their
variance term grows at most ``1/α``-fold over norm-only scores); a known-zero row that does get a
gradient costs up to ``1/ε``-fold, which is why a cell must be seen zero several times first.
Known-zero rows are drawn only where ``k`` exceeds the rows that do get a gradient: then every one
of those is a winner and the estimate is exact.

**Labels.** A row's label bit is set where its label *and the next position's* are ignored: a
causal LM's loss at position ``t`` reads ``labels[t+1]`` (Hugging Face shifts inside the loss), a
token classifier's reads ``labels[t]``; only rows both ignore surely get no gradient from them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "DECAY",
    "FLOOR",
    "KNOWN_ZERO_WEIGHT",
    "NUM_CELLS",
    "NUM_POSITIONS",
    "load_sampler_state_dict",
    "new_state",
    "observe",
    "predict",
    "reset_sampler_state",
    "row_cells",
    "fold",
    "graph_owned_state",
    "learning_state",
    "observation",
    "row_weights",
    "sampler_state_dict",
    "sampler_storages",
    "state_for",
]

NUM_POSITIONS = 512  # positions told apart; later ones share the last cell
NUM_CELLS = 4 * NUM_POSITIONS
STATE_SIZE = 2 * NUM_CELLS + 2  # [m (C) | n (C) | scale average | steps]
DECAY = 0.9  # β: a cell's average forgets a step's observation after ~10 steps
FLOOR = 0.1  # α: the least weight of a row not known to get no gradient, relative to the mean
KNOWN_ZERO_WEIGHT = 1e-4  # ε: the weight of rows in known-zero cells, relative to the mean
MIN_ZERO_OBSERVATIONS = 3  # a cell is known zero only after this many observations
IGNORE_INDEX = -100  # the label value torch's cross-entropy (and Hugging Face) ignores


def new_state(device: torch.device | str = "cpu") -> torch.Tensor:
    """A fresh, empty state: every cell unseen (its rows score by ``‖X_i‖`` alone)."""
    return torch.zeros(STATE_SIZE, dtype=torch.float32, device=device)


def row_cells(num_rows, seq_len, device: torch.device, attention_mask: torch.Tensor | None = None,
              labels: torch.Tensor | None = None) -> torch.Tensor:
    """The cell of each of ``num_rows = B·seq_len`` rows (int32, ``(N,)``: saved for backward, so
    half an int64's bytes); see the module docstring.

    ``attention_mask`` and ``labels``, where given, have ``num_rows`` elements in row order.
    """
    position = torch.arange(num_rows, device=device, dtype=torch.int32) % seq_len
    cells = position.clamp(max=NUM_POSITIONS - 1) * 4
    if attention_mask is not None:
        cells = cells + 2 * (attention_mask.reshape(-1) == 0).to(torch.int32)
    if labels is not None:
        ignored = (labels == IGNORE_INDEX).reshape(-1, seq_len)
        # The last position has no next label: count it as ignored there.
        next_ignored = torch.cat([ignored[:, 1:], torch.ones_like(ignored[:, :1])], dim=1)
        cells = cells + (ignored & next_ignored).reshape(-1).to(torch.int32)
    return cells


def _cell_means(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ĝ per cell, known zero per cell)``; unseen cells predict 1."""
    average, count = state[:NUM_CELLS], state[NUM_CELLS:2 * NUM_CELLS]
    corrected = average / (1.0 - torch.pow(DECAY, count)).clamp_min(1e-12)
    known_zero = (count >= MIN_ZERO_OBSERVATIONS) & (average == 0)
    return torch.where(count > 0, corrected, 1.0), known_zero


def _scale(state: torch.Tensor) -> torch.Tensor:
    steps = state[2 * NUM_CELLS + 1]
    corrected = state[2 * NUM_CELLS] / (1.0 - torch.pow(DECAY, steps)).clamp_min(1e-12)
    return torch.where(steps > 0, corrected, 1.0)


def predict(states: Sequence[torch.Tensor], cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ĝ_i, known zero_i)`` for each row (float32 and bool, ``(N,)``): the combined prediction
    of the weights sharing a sample, ``(Σ_j (s_j/max s)² ĝ_{j,c_i}²)^{1/2}``, and whether every one
    of them knows the row's cell gets no gradient."""
    cells = cells.long()
    scales = torch.stack([_scale(state) for state in states])
    scales = scales / scales.max().clamp_min(torch.finfo(torch.float32).tiny)
    total, known_zero = None, None
    for state, scale in zip(states, scales):
        means, zero = _cell_means(state)
        term = (means[cells] * scale) ** 2
        total = term if total is None else total + term
        known_zero = zero[cells] if known_zero is None else known_zero & zero[cells]
    predicted = total.sqrt()
    return torch.where(torch.isfinite(predicted), predicted, 1.0), known_zero


def row_weights(predicted: torch.Tensor, known_zero: torch.Tensor) -> torch.Tensor:
    """The factor ``w_i`` multiplying ``‖X_i‖``: ``max(ĝ_i/ḡ, α)``, and ``ε`` on known-zero rows."""
    live = ~known_zero
    mean = (torch.where(live, predicted, 0.0).sum() / live.sum().clamp_min(1))
    relative = predicted / mean.clamp_min(torch.finfo(torch.float32).tiny)
    relative = torch.where(mean > 0, relative, 1.0)  # nothing to tell the rows apart: ‖X_i‖ alone
    return torch.where(live, torch.clamp_min(relative, FLOOR), KNOWN_ZERO_WEIGHT)


def observation(cells: torch.Tensor, grad_2d: torch.Tensor) -> torch.Tensor:
    """What one backward's ``dY`` (``(N, out)``, rows in ``cells``' order) teaches, laid out like a
    state and *additive* over uses: per cell the sum of the rows' relative norms and their count,
    then the mean row norm and ``1`` (one use). All zero if ``dY`` is all zero, not finite, or has
    no rows: such a step says nothing about the rows' relative sizes."""
    norms = torch.linalg.vector_norm(grad_2d, dim=1, dtype=torch.float32)
    mean = norms.mean()  # NaN for no rows
    informative = torch.isfinite(mean) & (mean > 0)
    relative = norms / mean.clamp_min(torch.finfo(torch.float32).tiny)
    sums = torch.zeros(NUM_CELLS, dtype=torch.float32, device=grad_2d.device).index_add(0, cells, relative)
    counts = torch.zeros(NUM_CELLS, dtype=torch.float32, device=grad_2d.device).index_add(
        0, cells, torch.ones_like(relative))
    seen = torch.cat([sums, counts, mean.reshape(1), torch.ones_like(mean).reshape(1)])
    return torch.where(informative, seen, 0.0)


def fold(state: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """The state after the (summed) :func:`observation` s of one backward; unchanged if they
    carry nothing (no informative use) or are not finite."""
    sums, counts = seen[:NUM_CELLS], seen[NUM_CELLS:2 * NUM_CELLS]
    uses = seen[2 * NUM_CELLS + 1]
    informative = (uses > 0) & torch.isfinite(seen).all()
    observed = counts > 0
    average, count = state[:NUM_CELLS], state[NUM_CELLS:2 * NUM_CELLS]
    average = torch.where(observed, DECAY * average + (1.0 - DECAY) * sums / counts.clamp_min(1.0), average)
    count = count + observed.to(torch.float32)
    mean = seen[2 * NUM_CELLS:2 * NUM_CELLS + 1] / uses.clamp_min(1.0)
    scale = DECAY * state[2 * NUM_CELLS:2 * NUM_CELLS + 1] + (1.0 - DECAY) * mean
    steps = state[2 * NUM_CELLS + 1:] + 1.0
    return torch.where(informative, torch.cat([average, count, scale, steps]), state)


def observe(state: torch.Tensor, cells: torch.Tensor, grad_2d: torch.Tensor) -> torch.Tensor:
    """The state after one use's ``dY``: ``fold(state, observation(cells, grad_2d))``."""
    return fold(state, observation(cells, grad_2d))


# --- the states the backend and eager mode own, one per sampled weight ---------------------------

_STATES: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> state, by identity
_GRAPH_OWNED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # states of weights that are no input


def learning_state(device: torch.device | str = "cpu") -> torch.Tensor:
    """A new state that learns: a leaf that requires grad, whose "gradient" is the summed
    :func:`observation` s of the backward (every use of the weight adds its own, as autograd adds
    gradients), folded in by a hook once accumulated. So backward reads the state nowhere and
    writes it only after the graph has run: no in-place write to a tensor autograd saved, however
    many forwards share it before backward (siamese training, ``retain_graph``)."""
    state = new_state(device).requires_grad_()
    state.register_post_accumulate_grad_hook(_fold_accumulated)
    return state


def _fold_accumulated(state: torch.Tensor) -> None:
    with torch.no_grad():
        state.copy_(fold(state, state.grad))
    state.grad = None


def state_for(weight: torch.Tensor) -> torch.Tensor:
    """The learning state of ``weight`` (created on first use, on its device; moved with it); it
    lives as long as the weight does, across recompiles and graph caches (it is a graph input,
    not a constant). It learns from ``.backward()``; ``torch.autograd.grad`` computes only the
    gradients asked of it, so it leaves the state as it was."""
    state = _STATES.get(weight)
    if state is None or state.device != weight.device:
        moved = learning_state(weight.device)
        if state is not None:
            with torch.no_grad():
                moved.copy_(state)
        state = _STATES[weight] = moved
    return state


def graph_owned_state(device: torch.device | str) -> torch.Tensor:
    """A new learning state for a weight a compiled graph computes rather than receives: it lives
    with that graph (no parameter to key it by, so :func:`sampler_state_dict` does not list it)."""
    state = learning_state(device)
    _GRAPH_OWNED[state] = True
    return state


def sampler_storages() -> set[tuple[str, int]]:
    """``(device, data_ptr)`` of every live state's storage: persistent, like buffers (not
    activations), for :class:`wtacompile.SavedTensorMeter` to leave out."""
    states = [*_STATES.values(), *_GRAPH_OWNED.keys()]
    return {(str(s.device), s.untyped_storage().data_ptr()) for s in states if s.device.type != "meta"}


def sampler_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The learned ``‖dY‖`` predictions of ``model``'s sampled weights, by parameter name (copies),
    to save beside a checkpoint; :func:`load_sampler_state_dict` restores them. A
    ``torch.compile`` d module gives its original module's names.

    Whether it matters for resuming: a fresh state scores rows by ``‖X_i‖`` for one step and
    has learned the padding and position pattern after ``MIN_ZERO_OBSERVATIONS`` steps.
    """
    model = getattr(model, "_orig_mod", model)
    return {name: _STATES[p].detach().clone() for name, p in model.named_parameters() if p in _STATES}


def load_sampler_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Restore what :func:`sampler_state_dict` saved, in place (compiled graphs keep reading them)."""
    parameters = dict(getattr(model, "_orig_mod", model).named_parameters())
    unknown = sorted(set(state_dict) - set(parameters))
    if unknown:
        raise KeyError(f"sampler state for unknown parameter(s) {', '.join(unknown)}")
    for name, saved in state_dict.items():
        if saved.shape != (STATE_SIZE,):
            raise ValueError(f"sampler state for {name!r} has shape {tuple(saved.shape)}, expected "
                             f"({STATE_SIZE},): saved by another version of wtacompile")
        with torch.no_grad():
            state_for(parameters[name]).copy_(saved)


def reset_sampler_state(model: torch.nn.Module | Iterable[torch.Tensor]) -> None:
    """Forget what was learned for ``model``'s weights (in place: compiled graphs see the reset)."""
    weights = model.parameters() if isinstance(model, torch.nn.Module) else model  # compiled too
    for weight in weights:
        state = _STATES.get(weight)
        if state is not None:
            with torch.no_grad():
                state.zero_()
