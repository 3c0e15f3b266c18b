"""Stage B of split_linear: the members of a mini-batch one by one, as vertices of the row space.

Each round proposes a vertex (an LP: label-seeded, random, in the deflated or the full row space,
or excluding what was found), pins it by its zero set (vertices.refine), and accepts it only if it
passes the tests a true feature passes: a one-dimensional null space, the right signs, zeros at
the noise level, no essential zero row (face vertices have one), and the softmax label test
(softmax(W a + b) - e_y must lie in the gradient's column space). An accepted member is deflated
out exactly, so the search continues in one dimension less. A last missing member comes from the
softmax itself; vertices with an essential row complete the set when the final checks agree.
Pure numpy; split_linear (rconv/linear_split.py) decides what the result is worth.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
from scipy.special import softmax

from .vertices import Refined, lp_vertex, lp_vertex_excluding, refine, seed_objectives

# Guards divisions by norms that may be zero; far below anything real gradients produce.
TINY = 1e-300
# Measured per precision (REPORT of the prototype, 1148 runs, 0 false "ok"):
# rank threshold in units of eps ||M||_F: the noise floor sigma_{B+1} reached 0.83 (float64) and
# 0.19 (float32), the smallest true sigma_B 1.5e9 and 2.7 (float32, duplicate labels, K = 10).
_RANK_EPS = {"float64": 1e3, "float32": 1.5}
# First zero threshold relative to the largest entry: float64 zeros sit at 1e-15, float32 at 1e-7.
_TAU = {"float64": 1e-9, "float32": 1e-4}
# LP slack x >= -slack / n: float32 rounding can push exact zeros below 0 and empty the polytope.
_SLACK = {"float64": 1e-10, "float32": 1e-5}
# Softmax label test: true features leave 1e-16 (float64) / <= 3e-6 (float32), face vertices ~1e-4.
_LABEL = {"float64": 1e-10, "float32": 1e-6}
# A feature with an essential zero row is still accepted below this label residual (off in float32,
# where face vertices reach it).
_LABEL_STRICT = {"float64": 1e-10, "float32": 0.0}
# Target relative error of a feature; error bars above it make the result "imprecise".
_TARGET = {"float64": 1e-6, "float32": 1e-3}
# Floor of the softmax and scale checks: strict for precise decompositions.
_CHECK = {"float64": 1e-10, "float32": 1e-5}
# A zero row with leverage above 1 - this is essential: one coordinate alone pins the vertex.
_LEVERAGE = 1e-3
# Tolerances that scale with the row space's noise use this multiple of it (the error estimate
# is within 0.06-2.1x of the actual error).
_NOISE_MULTIPLE = 30.0
# Noise blurs an essential row's leverage below 1 by about this many noise levels, at most this much.
_LEVERAGE_NOISE, _LEVERAGE_CAP = 3.0, 0.1
# LP slack grows with the noise (this fraction of it), up to a cap, and by this factor on
# infeasibility, up to a ceiling.
_SLACK_NOISE, _SLACK_CAP, _SLACK_GROWTH, _SLACK_CEILING = 0.1, 1e-3, 10.0, 1e-2
# The null space of a zero set is one direction when its second singular value exceeds the first
# by this factor (and this many times the zero threshold).
_NULL_GAP = 10.0
# Sign-consistency: the most negative entry may reach this many eps, or twice the zeros' noise.
_SIGN_EPS, _SIGN_NOISE = 10.0, 2.0
# Zeros at the noise level: at most this many eps relative (or the noise multiple).
_ZERO_EPS = 1e3
# Two vectors are the same member when their cosine exceeds 1 - this.
_SAME = 1e-6
# Deflate only when the best label explains the vertex this many times better than the second.
_LABEL_MARGIN = 30.0
# A member's share of the batch, m_n / B, lies in (0, 1]; rounding may carry it this far above.
_SHARE_SLACK = 1e-6
# Budget: LPs per member of the rank (B >= K batches spend it all, about 2 s at K = 10).
_LPS_PER_RANK = 60
# After this many LPs per rank without a new member, change strategy (full space, completions).
_STALL_PER_RANK = 5
# Vertices with an essential row tried together to complete a set (the 8 with most zeros).
_POOL_SIZE = 8
# A softmax completion is replaced by its zero-set polish only when they agree this closely.
_POLISH_AGREE = 1e-2
# Seconds the search may take: ten times the LP budget's measured 2 s (K = 10), so that only a search
# lost in noise (noisy, clipped or multi-step gradients, where each LP of 100 classes takes about a
# second) stops on it, and an attack with its error bound's rerun still answers within a minute.
SEARCH_TIME_LIMIT = 20.0


@dataclass(frozen=True)
class SplitTolerances:
    """What the precision of the gradients allows split_linear (measured on float64 and float32)."""

    eps: float
    rank: float  # singular values above rank * eps * ||M||_F count
    tau: float  # first zero threshold, relative to the largest entry
    slack: float  # LP slack before scaling with the noise
    label: float  # softmax label test
    label_strict: float  # label residual that admits a feature with an essential zero row
    target: float  # a feature's relative error that counts as exact
    check: float  # floor of the final consistency checks

    @classmethod
    def for_dtype(cls, name, eps):
        """The tolerances for gradients of precision `name` ("float64" or "float32")."""
        return cls(eps=eps, rank=_RANK_EPS[name] * eps, tau=_TAU[name], slack=_SLACK[name], label=_LABEL[name],
                   label_strict=_LABEL_STRICT[name], target=_TARGET[name], check=_CHECK[name])


class RowSpace(NamedTuple):
    """The gradient M = [dL/dW, dL/db] (K x N+1) and its numerical row space."""

    gradient: np.ndarray  # M
    left: np.ndarray  # U0 (K x r): M's column space
    sigma: np.ndarray  # the r leading singular values
    basis: np.ndarray  # V0 (N+1 x r): M's row space, bias coordinate last
    active: np.ndarray  # coordinates not zero for the whole batch
    noise: float  # sigma_{r+1}: rounding left in M
    noise_rel: float  # sigma_{r+1} / sigma_r: bound on the row space's angular error
    weight: np.ndarray  # the Linear layer's weight (K x N)
    bias: np.ndarray  # and bias (K,)

    @property
    def rank(self):
        return self.basis.shape[1]


class LabelFit(NamedTuple):
    """The label whose softmax residual d = softmax(W a + b) - e_y the gradient's columns explain best."""

    label: int
    delta: np.ndarray  # d
    residual: float  # ||(I - U0 U0^T) d|| / ||d||
    margin: float  # second-best residual over the best
    largest_logit: float


class _Vertex(NamedTuple):
    """A vertex with an essential zero row, kept to complete a set of members."""

    row: np.ndarray  # [a, 1]
    zeros: int


class SearchOutcome(NamedTuple):
    """The members stage B found: rows [a_n, 1], how many LPs it took, what it turned down, and why it
    stopped before it had found every member or run out of LPs ("" when it did not)."""

    members: list
    lps: int
    rejected: Counter
    stopped: str = ""


def label_fit(features, space):
    """The label test of one feature (judged relative to ||d||, so that a saturated member's predicted
    class, with d ~ 0, which any space explains, is not chosen)."""
    classes = space.weight.shape[0]
    logits = space.weight @ features + space.bias
    p = softmax(logits)
    left = space.left
    outside = p - left @ (left.T @ p)
    residuals = np.linalg.norm(outside[:, None] - (np.eye(classes) - left @ left.T), axis=0)
    norms = np.sqrt(np.maximum((p ** 2).sum() - 2 * p + 1, 0))  # ||p - e_y|| for every y
    relative = residuals / np.maximum(norms, TINY)
    best, second = np.argsort(relative)[:2]
    delta = p.copy()
    delta[best] -= 1.0
    return LabelFit(int(best), delta, float(relative[best]), float(relative[second] / max(relative[best], TINY)),
                    float(np.abs(logits).max()))


def deflation_share(coefficients, remaining, member, delta):
    """alpha with rank(C - alpha delta member^T) = remaining - 1: alpha = 1 / (member^T S^-1 U^T delta) = m_n / B."""
    u, s, wt = np.linalg.svd(coefficients, full_matrices=False)
    with np.errstate(divide="ignore", invalid="ignore"):  # a delta outside the remaining space: turned down
        return 1.0 / ((wt[:remaining] @ member) @ ((u[:, :remaining].T @ delta) / s[:remaining]))


def softmax_completion(space, members):
    """The one member missing when rank - 1 are known, from the softmax instead of a zero set.

    With u the coefficient direction orthogonal to the known members, M V0 u = U S u is parallel
    to the missing contribution (p - e_y) / B: its one negative entry is the label, and its other
    entries give the logit differences z_k - z_j = log(c_k / c_j), K - 2 equations linear in the
    member's coefficients q ([a, 1] = V0 q), plus the bias entry (V0 q)[N] = 1: least squares.
    """
    basis = space.basis
    n = basis.shape[0] - 1
    known = np.array([basis.T @ v for v in members]).T
    u = np.linalg.svd(known.T)[2][-1]
    c = space.left @ (space.sigma * u)
    if (c < 0).sum() > (c > 0).sum():
        c = -c
    if (c < 0).sum() != 1:
        return None
    label = int(np.argmin(c))
    others = np.flatnonzero(np.arange(len(c)) != label)
    anchor = others[np.argmax(c[others])]
    others = others[others != anchor]
    linear = space.weight @ basis[:n]  # logits' part linear in q
    rows = linear[others] - linear[anchor]
    rhs = np.log(c[others] / c[anchor]) - (space.bias[others] - space.bias[anchor])
    scale = np.linalg.norm(rows, axis=1).mean()
    q = np.linalg.lstsq(np.vstack([rows, scale * basis[n][None]]), np.concatenate([rhs, [scale]]), rcond=None)[0]
    v = basis @ q
    return v / v[n]


def _is_new(vector, pool):
    size = np.linalg.norm(vector)
    return not any(abs(vector @ other) > (1 - _SAME) * size * np.linalg.norm(other) for other in pool)


class _Search:
    """The state of stage B: members found, the deflated coefficients, the LP budget."""

    def __init__(self, space, tol, consistent, rng, deadline):
        self.space, self.tol, self.consistent, self.rng = space, tol, consistent, rng
        self.deadline, self.timed_out, self.empty = deadline, False, None
        r = space.rank
        self.label_informative = r < space.weight.shape[0] - 1  # at r = K - 1 every d lies in col(M)
        self.label_tol = max(tol.label, _NOISE_MULTIPLE * space.noise_rel)
        self.leverage_tol = min(_LEVERAGE_CAP, max(_LEVERAGE, _LEVERAGE_NOISE * space.noise_rel))
        self.slack = min(_SLACK_CAP, max(tol.slack, _SLACK_NOISE * space.noise_rel))
        self.coefficients = space.left * space.sigma  # M = C V0^T; deflation acts on C
        self.remaining = r
        self.deflating = self.label_informative
        self.mixed = False  # alternate with the full row space once deflation stalls
        self.found, self.pool = [], []
        self.seeds = seed_objectives(space.gradient, space.basis, r, space.active) if r > 1 else []
        self.lps, self.since_new = 0, 0
        self.pool_tried = False
        self.rejected = Counter()

    def _out_of_time(self):
        """Whether the deadline (time.monotonic()) has passed; remembered, so that the outcome says so."""
        self.timed_out = self.timed_out or time.monotonic() > self.deadline
        return self.timed_out

    def _empty(self):
        """Whether the row space holds no x >= -slack / n with 1^T x = 1 even at the largest slack: then
        every LP in it, whatever its objective, is infeasible, and so are those in its subspaces."""
        if self.empty is None and self.slack >= _SLACK_CEILING:
            active = self.space.active
            x = lp_vertex(self.space.basis[active], np.zeros(len(active)), self.slack, deadline=self.deadline)
            self.empty = None if x is None and self._out_of_time() else x is None
        return bool(self.empty)

    def _basis(self):
        if self.deflating and self.remaining < self.space.rank:
            wt = np.linalg.svd(self.coefficients, full_matrices=False)[2]
            return self.space.basis @ wt[:self.remaining].T
        return self.space.basis

    def _propose(self, basis, full):
        """The next LP vertex (or, with one member left after deflation, the deflated space itself)."""
        active = self.space.active
        if self.deflating and self.remaining == 1 and not full:
            x = basis[active, 0] * np.sign(basis[active, 0].sum())
            return x / x.sum()
        if full:
            return lp_vertex(self.space.basis[active], self.rng.standard_normal(len(active)), self.slack,
                             deadline=self.deadline)
        if self.seeds:
            return lp_vertex(basis[active], self.seeds.pop(0), self.slack, deadline=self.deadline)
        if self.found and not self.deflating and self.lps % 2 == 0:
            known = np.array([self.space.basis.T @ v for v in self.found]).T
            direction = self.rng.standard_normal(self.space.rank)
            direction -= known @ np.linalg.lstsq(known, direction, rcond=None)[0]
            return lp_vertex_excluding(self.space.basis[active], self.rng.exponential(size=len(active)),
                                       direction, self.slack, deadline=self.deadline)
        return lp_vertex(basis[active], self.rng.standard_normal(len(active)), self.slack, deadline=self.deadline)

    def _pin(self, x, basis, full):
        """x pinned by its zero set: in the full basis, else in the deflated one, else (the last
        member) the deflated space itself."""
        tol, space = self.tol, self.space
        refined = refine(space.basis, space.active, x, tol.tau, deadline=self.deadline)
        deflated = self.deflating and not full
        if deflated and 1 < self.remaining < space.rank and \
                (refined is None or refined.second < max(_NULL_GAP * refined.resid, _NULL_GAP * tol.tau)):
            # too few zeros to pin it among all r members: the deflated space holds only the rest
            refined = refine(basis, space.active, x, tol.tau, deadline=self.deadline)
        if refined is None and deflated and self.remaining == 1:
            # the last member: the deflated row space is the member itself, no zero set needed
            v = basis[:, 0] * np.sign(basis[space.active, 0].sum())
            xa = v[space.active]
            refined = Refined(vector=v, zeros=space.active[xa <= tol.tau * xa.max()], resid=0.0, second=1.0,
                              max_leverage=0.0, negative=float(-min(xa.min(), 0) / xa.max()), zero_noise=0.0)
        return refined

    def _rejection(self, refined):
        """Why a pinned vertex is not a member, before its label is known ("" when it may be one)."""
        tol, n = self.tol, self.space.basis.shape[0] - 1
        if refined.second < max(_NULL_GAP * refined.resid, _NULL_GAP * tol.tau):
            return "null space not one direction"
        if refined.vector[n] <= 0 or refined.negative > max(_SIGN_EPS * tol.eps, _SIGN_NOISE * refined.zero_noise):
            return "not sign-consistent"
        if refined.zero_noise > max(_ZERO_EPS * tol.eps, _NOISE_MULTIPLE * self.space.noise_rel):
            return "zeros not at the noise level"
        if not _is_new(refined.vector, self.found):
            return "already found"
        return ""

    def _examine(self, refined):
        """The member [a, 1] if the vertex passes every test (deflating it out), else None."""
        reason = self._rejection(refined)
        if reason:
            self.rejected[reason] += 1
            return None
        n = self.space.basis.shape[0] - 1
        v = refined.vector / refined.vector[n]
        fit = label_fit(v[:n], self.space)
        # the client's own softmax carries rounding ~ eps |logit| (large logits: saturated models)
        if self.label_informative and fit.residual > max(self.label_tol, _NOISE_MULTIPLE * self.tol.eps *
                                                         fit.largest_logit):
            self.rejected["softmax label test"] += 1
            return None
        if 1 - refined.max_leverage < self.leverage_tol and not self._admit_essential(fit):
            self.rejected["essential zero row (face vertex)"] += 1
            if _is_new(v, [vertex.row for vertex in self.pool]):
                self.pool.append(_Vertex(v, len(refined.zeros)))
            return None
        return v if self._deflate(v, fit) else None

    def _admit_essential(self, fit):
        """A vertex with an essential zero row is a member when it is the last one left after
        deflation, or when its label residual is at rounding level (float64)."""
        last = self.deflating and self.remaining == 1
        return last or (self.label_informative and fit.residual < self.tol.label_strict)

    def _deflate(self, v, fit):
        """Remove the member's rank-one share from the coefficients; False if its share is impossible."""
        if not self.deflating:
            return True
        member = self.space.basis.T @ v
        share = deflation_share(self.coefficients, self.remaining, member, fit.delta)
        if not 0 < share <= 1 + _SHARE_SLACK:
            self.rejected["share m_n / B outside (0, 1]"] += 1
            return False
        if fit.margin < _LABEL_MARGIN:
            self.deflating = False  # the label is not decisive: search the full row space from now on
        else:
            self.coefficients = self.coefficients - share * np.outer(fit.delta, member)
            self.remaining -= 1
        return True

    def _complete_from_pool(self):
        """Members missing, from the vertices with an essential row, if some set passes the final checks."""
        need = self.space.rank - len(self.found)
        if need <= 0 or len(self.pool) < need:
            return []
        candidates = [vertex.row for vertex in sorted(self.pool, key=lambda vertex: -vertex.zeros)[:_POOL_SIZE]]
        for combination in itertools.combinations(candidates, need):
            if self._out_of_time():
                break
            if self.consistent(np.array(self.found + list(combination))):
                return list(combination)
        return []

    def _next_member(self):
        """One more member (or a completing set of them): a list, empty when the budget runs out."""
        r = self.space.rank
        basis = self._basis()
        while self.lps < _LPS_PER_RANK * r and not self._out_of_time():
            self.lps += 1
            self.since_new += 1
            stalled = self.since_new > _STALL_PER_RANK * r
            if stalled and self.deflating and not self.mixed:
                self.mixed, self.since_new, stalled = True, 0, False
                self.rejected["deflation stalled"] += 1
            if stalled and self.pool and not self.pool_tried:
                self.pool_tried = True  # once per member found
                completion = self._complete_from_pool()
                if completion:
                    return completion
            full = self.mixed and self.lps % 2 == 1
            x = self._propose(basis, full)
            if x is None and self._out_of_time():
                break
            if x is None:
                self.rejected["LP infeasible"] += 1
                self.slack = min(_SLACK_CEILING, self.slack * _SLACK_GROWTH)
                if self._empty():
                    break
                continue
            refined = self._pin(x, basis, full)
            if refined is None and self._out_of_time():
                break
            if refined is None:
                self.rejected["no zero set pins it"] += 1
                continue
            member = self._examine(refined)
            if member is not None:
                return [member]
        return []

    def run(self):
        r = self.space.rank
        while len(self.found) < r:
            more = self._next_member()
            if not more:
                break
            self.found.extend(more)
            self.since_new, self.pool_tried = 0, False
        if len(self.found) < r and not self.pool_tried and not self.timed_out:
            self.found.extend(self._complete_from_pool())
        if len(self.found) == r - 1 and r >= 2:
            v = softmax_completion(self.space, self.found)
            if v is not None and v[self.space.active].max() > 0:
                self.found.append(self._polish(v))
                self.rejected["completed from the softmax"] += 1
        return SearchOutcome(self.found, self.lps, self.rejected, self._stopped())

    def _stopped(self):
        members = f"{len(self.found)} of the {self.space.rank} members the gradient's rank shows"
        if self.empty:
            return (f"the gradient's row space holds no nonnegative vector, as every feature behind a ReLU is, "
                    f"even with the largest LP slack ({_SLACK_CEILING:g}): noise (a defence such as DP-SGD's) "
                    f"or no batch's mean gradient; the search stopped with {members}")
        if self.timed_out:
            return f"the LP vertex search stopped at its time limit after {self.lps} LPs, with {members}"
        return ""

    def _polish(self, v):
        """A softmax completion sharpened by its zero set, when that set pins a vector close to it."""
        active, n = self.space.active, self.space.basis.shape[0] - 1
        xa = v[active] / v[active].sum()
        refined = refine(self.space.basis, active, np.maximum(xa, 0), self.tol.tau)
        if refined is None or refined.vector[n] <= 0 or refined.second < _NULL_GAP * refined.resid:
            return v
        polished = refined.vector / refined.vector[n]
        return polished if np.abs(polished - v).max() < _POLISH_AGREE * np.abs(v).max() else v


def search_members(space, tol, consistent: Callable[[np.ndarray], bool], seed=0, *, time_limit=SEARCH_TIME_LIMIT):
    """Stage B: the members of the row space one by one (see the module's docstring).

    consistent(rows) says whether a complete set of rows [a_n, 1] passes split_linear's final checks.
    time_limit: seconds after which the search stops with what it has (math.inf: only its LP budget
    stops it); its LPs and zero-set refinements are cut off at the same moment.
    """
    deadline = time.monotonic() + time_limit if math.isfinite(time_limit) else math.inf
    return _Search(space, tol, consistent, np.random.default_rng(seed), deadline).run()
