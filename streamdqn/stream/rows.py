"""Replay rows: one row per visited step, with the target of every action in it.

A row holds the raw state of a step, a reward for each of the five actions with a mask of which of
them are known, and what the value of `ignore` bootstraps from:

    states[30], rewards[5], known[5]      responses (contain, terminate, quarantine, review) end the
                                          episode: their known rewards are terminal targets
    next_states[30], horizon              ignore: rewards[0] is the (n-step) sum of the ignore rewards
                                          from this step on, and the target adds
                                          gamma**horizon * Q(next_states) when horizon > 0
                                          (horizon 0: terminal, nothing to bootstrap)
    logged_action, action_prob            what the deployed policy did at this step (-1 / NaN: nothing
                                          logged), for off-policy estimates
    episode                               a stable 63-bit hash of (sandbox_id, episode_id): finds an
                                          episode's rows again, e.g. to relabel them
    malicious, severity, ignore_steps,    what the rewards were computed from, so that a revised label
    window_final, table_mask              can recompute them in place (see `relabel_rewards`)

With the label known, the four responses' rewards come from the reward table and `ignore` bootstraps;
an event's `reward` field replaces the table's value for its logged action only (ignore when nothing
was logged). Each sampled row teaches all five Q-values, where the earlier design pushed the step plus
four counterfactual response transitions: five rows for one step.

Numpy only; the learning side turns rows into tensors (streamdqn.learning.replay).
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np

from streamdqn.stream.features import FEATURE_DIM
from streamdqn.stream.rewards import RewardTable
from streamdqn.stream.wire import Action

N_ACTIONS = len(Action)
IGNORE = int(Action.IGNORE)


class ReplayRows(NamedTuple):
    """A batch of replay rows, every field an array of the same length N."""

    states: np.ndarray  # float32 [N, 30]
    rewards: np.ndarray  # float32 [N, 5]
    known: np.ndarray  # bool [N, 5]
    next_states: np.ndarray  # float32 [N, 30]
    horizon: np.ndarray  # int8 [N]: ignore bootstraps gamma**horizon * Q(next); 0 = terminal
    logged_action: np.ndarray  # int8 [N]: -1 when the event logged no action
    action_prob: np.ndarray  # float32 [N]: NaN when not logged
    episode: np.ndarray  # int64 [N]: episode_hash() of the row's episode
    malicious: np.ndarray  # bool [N]: the label the rewards were computed from
    severity: np.ndarray  # float32 [N]
    ignore_steps: np.ndarray  # int8 [N]: ignore rewards summed into rewards[:, 0] (0: ignore unknown)
    window_final: np.ndarray  # bool [N]: the last of them was the episode's final step
    table_mask: np.ndarray  # uint8 [N]: bit a set = rewards[:, a] came from the reward table

    @property
    def size(self) -> int:
        """How many rows (len() stays the tuple's field count, as for any NamedTuple)."""
        return len(self.horizon)

    @staticmethod
    def empty(n: int = 0) -> ReplayRows:
        return ReplayRows(
            states=np.zeros((n, FEATURE_DIM), np.float32), rewards=np.zeros((n, N_ACTIONS), np.float32),
            known=np.zeros((n, N_ACTIONS), bool), next_states=np.zeros((n, FEATURE_DIM), np.float32),
            horizon=np.zeros(n, np.int8), logged_action=np.full(n, -1, np.int8),
            action_prob=np.full(n, np.nan, np.float32), episode=np.zeros(n, np.int64),
            malicious=np.zeros(n, bool), severity=np.zeros(n, np.float32), ignore_steps=np.zeros(n, np.int8),
            window_final=np.zeros(n, bool), table_mask=np.zeros(n, np.uint8),
        )

    @staticmethod
    def concat(parts: list[ReplayRows]) -> ReplayRows:
        parts = [p for p in parts if p.size]
        if not parts:
            return ReplayRows.empty()
        if len(parts) == 1:
            return parts[0]
        return ReplayRows(*(np.concatenate(columns) for columns in zip(*parts, strict=True)))


ROW_FIELDS: tuple[str, ...] = ReplayRows._fields
# Per-field dtype and trailing shape: the learning side's storage is laid out from this.
ROW_LAYOUT: dict[str, tuple[np.dtype[np.generic], tuple[int, ...]]] = {
    name: (column.dtype, column.shape[1:])
    for name, column in zip(ROW_FIELDS, ReplayRows.empty(), strict=True)
}


def episode_hash(sandbox_id: str, episode_id: str) -> int:
    """A stable non-negative 63-bit id of an episode (the same before and after a restart)."""
    data = f"{sandbox_id}\0{episode_id}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


def relabel_rewards(
    rows: ReplayRows, malicious: bool, severity: float, rewards: RewardTable, gamma: float
) -> tuple[np.ndarray, np.ndarray]:
    """The rewards and known-mask of `rows` under another label; entries that did not come from the
    reward table (a logged reward) keep their value. Returns (rewards float32 [N,5], known bool [N,5])."""
    n = rows.size
    out = rows.rewards.copy()
    mal = np.full(n, malicious)
    sev = np.full(n, severity)
    for action in range(1, N_ACTIONS):
        from_table = (rows.table_mask >> action) & 1 == 1
        value = rewards.rewards(np.full(n, action), mal, sev, np.zeros(n, bool))
        out[:, action] = np.where(from_table, value, out[:, action])
    from_table = (rows.table_mask & 1 == 1) & (rows.ignore_steps > 0)
    steps = rows.ignore_steps.astype(np.int64)
    step_reward = rewards.rewards(np.zeros(n, np.int64), mal, sev, np.zeros(n, bool))
    final_reward = rewards.rewards(np.zeros(n, np.int64), mal, sev, np.ones(n, bool))
    # sum_{j<m} gamma^j r_step, with the last term the final reward when the window ends the episode.
    geometric = steps.astype(np.float64) if gamma == 1.0 else (1 - gamma**steps) / (1 - gamma)
    last = np.where(rows.window_final, gamma ** np.maximum(steps - 1, 0) * (final_reward - step_reward), 0.0)
    ignore = step_reward * geometric + last
    out[:, IGNORE] = np.where(from_table, ignore, out[:, IGNORE])
    return out.astype(np.float32), rows.known.copy()


class StepTable(NamedTuple):
    """Steps of several episodes, each episode's steps contiguous and in step order: what rows are
    built from. Labels are resolved per step by the caller (a verdict, else the inline label)."""

    features: np.ndarray  # float32 [M, 30]
    group: np.ndarray  # int64 [M]: the step's episode, 0..G-1, non-decreasing
    malicious: np.ndarray  # int8 [M]: -1 while the episode's label is unknown
    severity: np.ndarray  # float32 [M]
    final: np.ndarray  # bool [M]: the event said final
    action: np.ndarray  # int8 [M]: the logged action, -1 none
    action_prob: np.ndarray  # float32 [M]
    reward: np.ndarray  # float64 [M]: the logged reward, NaN none
    shadow: np.ndarray  # bool [M]


class BuiltRows(NamedTuple):
    rows: ReplayRows
    emitted: np.ndarray  # bool [M]: the steps whose rows are in `rows` (the others must wait)
    logged_reward: np.ndarray  # float64 [M]: each emitted step's one-step reward of what the sandbox did


def build_rows(
    table: StepTable,
    ended: np.ndarray,
    episodes: np.ndarray,
    *,
    rewards: RewardTable,
    gamma: float,
    n_steps: int = 1,
    reward_clip: float = 10.0,
) -> BuiltRows:
    """The rows of every step whose targets are all known now.

    ended: bool [G], the episode is over (its last step here counts as its final one);
    episodes: int64 [G], episode_hash of each episode. A step waits (emitted False) while its label is
    unknown or its ignore window reaches past the last step seen of an episode that is not over.
    A logged response that was carried out (not shadow) ends the episode: at that step ignore is
    unknown (unless it was also the final step); earlier windows bootstrap from it.
    """
    m = len(table.group)
    if m == 0:
        return BuiltRows(ReplayRows.empty(), np.zeros(0, bool), np.zeros(0))
    group = table.group
    idx = np.arange(m)
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    group_end = np.append(starts[1:], m)
    end = group_end[np.searchsorted(starts, idx, side="right") - 1]  # exclusive end of each step's episode
    last = idx == end - 1
    final = table.final | (last & ended[group])
    labelled = table.malicious >= 0
    mal = table.malicious == 1
    sev = table.severity.astype(np.float64)

    one_step = np.empty((m, N_ACTIONS))
    for action in range(N_ACTIONS):
        one_step[:, action] = rewards.rewards(np.full(m, action), mal, sev, final)
    table_mask = np.full(m, (1 << N_ACTIONS) - 1, dtype=np.uint8)
    logged = np.where(table.action >= 0, table.action, IGNORE).astype(np.int64)
    override = ~np.isnan(table.reward)
    if override.any():
        rows_o = np.flatnonzero(override)
        one_step[rows_o, logged[rows_o]] = np.clip(table.reward[rows_o], -reward_clip, reward_clip)
        table_mask[rows_o] &= ~(1 << logged[rows_o]).astype(np.uint8)
    censored = (table.action >= 1) & ~table.shadow
    ignore_known = labelled & ~(censored & ~final)

    # The ignore window of each step: sum gamma^k r_ignore over k < n_steps, stopping at the final step
    # (terminal), before a step whose ignore is unknown (bootstrap from it), or at n_steps (bootstrap).
    total = np.zeros(m)
    steps = np.zeros(m, np.int64)
    horizon = np.zeros(m, np.int64)
    nxt = idx.copy()
    window_final = np.zeros(m, bool)
    window_table = ignore_known.copy()
    open_ = ignore_known.copy()  # still summing
    complete = labelled.copy()
    for k in range(n_steps):
        j = np.minimum(idx + k, m - 1)
        inside = open_ & (idx + k < end)
        beyond = open_ & ~inside  # the window needs a step not seen yet
        complete &= ~beyond
        open_ &= inside
        stop_before = open_ & (k > 0) & ~ignore_known[j]
        horizon[stop_before], nxt[stop_before] = k, j[stop_before]
        open_ &= ~stop_before
        total[open_] += gamma**k * one_step[j[open_], IGNORE]
        steps[open_] = k + 1
        window_table[open_] &= (table_mask[j[open_]] & 1) == 1
        terminal = open_ & final[j]
        window_final |= terminal
        open_ &= ~terminal
    # A window that summed n_steps rewards bootstraps from the step after them, if it has been seen.
    after = idx + n_steps
    seen = after < end
    horizon[open_ & seen], nxt[open_ & seen] = n_steps, after[open_ & seen]
    complete &= ~(open_ & ~seen)

    emitted = complete & labelled
    rows_i = np.flatnonzero(emitted)
    values = one_step[rows_i].copy()
    values[:, IGNORE] = total[rows_i]
    known = np.ones((len(rows_i), N_ACTIONS), bool)
    known[:, IGNORE] = ignore_known[rows_i]
    mask = table_mask[rows_i] & ~np.uint8(1)
    mask |= (window_table[rows_i] & ignore_known[rows_i]).astype(np.uint8)
    rows = ReplayRows(
        states=table.features[rows_i].astype(np.float32, copy=False),
        rewards=values.astype(np.float32),
        known=known,
        next_states=table.features[nxt[rows_i]].astype(np.float32, copy=False),
        horizon=horizon[rows_i].astype(np.int8),
        logged_action=table.action[rows_i].astype(np.int8),
        action_prob=table.action_prob[rows_i].astype(np.float32),
        episode=episodes[group[rows_i]].astype(np.int64),
        malicious=mal[rows_i],
        severity=table.severity[rows_i].astype(np.float32),
        ignore_steps=steps[rows_i].astype(np.int8),
        window_final=window_final[rows_i],
        table_mask=mask.astype(np.uint8),
    )
    logged_reward = np.where(emitted, one_step[idx, logged], 0.0)
    return BuiltRows(rows, emitted, logged_reward)
