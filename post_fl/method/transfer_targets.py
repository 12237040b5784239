"""The fixed targets of POST's transfer, computed once before its loop.

Only the teacher's prompt changes during transfer, so for each public text x the student's prompted
output s(x; P_s), its plain output s(x) and the teacher's plain output t(x) are constants:
:func:`compute_targets` runs those three forward passes once (no gradients, batches of similar
length), and each transfer step then costs one teacher forward/backward with the trained prompt.
The plain class predictions of both models are kept too (for ``transfer.alpha = "auto"``).

**Vocabulary space, ``transfer.target_top_k`` = k.** With k = 0, or k at least the vocabulary size V,
the full answer-position logits are kept and the loss is the uncached loss (up to float rounding of
differently sized batches). With 0 < k < V each text keeps only the k tokens

    I(x) = top-k over v of  max( softmax(s(x; P_s)/T)_v, softmax(Δ_s(x)/T)_v, softmax(t(x)/T)_v ),
    Δ_s = s(x; P_s) - s(x),

i.e. the tokens carrying most probability in either target distribution of the loss or in the
teacher's own unprompted distribution, with the three logit vectors at I(x). Each step gathers the
live teacher logits t(x; P_t) at I(x) and computes both KL terms on those k columns.

* exact: every logit on I(x) is the one the full computation uses (nothing is quantised), so the
  loss is the full-vocabulary loss whenever the four distributions put no mass outside I(x);
* approximated: each KL is taken between the distributions renormalised over I(x), so probability
  mass outside I(x) is ignored (neither matched nor penalised, including mass the teacher's prompted
  output may move there). The kept mass is reported (:attr:`TransferTargets.kept_mass`).

**Centred change, ``transfer.center_change``.** The targets then hold s(x) + Δ_s(x) − m in place of
s(x; P_s), with m the mean of Δ_s over the texts whose targets are computed (public text only; over the
whole vocabulary, before the top-k cut), so the change term asks the teacher for each text's change
*minus* the change the student prompt makes on every text alike, which on a biased student is mostly
the correction of that bias. The output term reads the same centred prompted output. The top-k tokens
are still chosen from the uncentred change.

Memory: 3 n k floats and n k indices (k = 256, 2000 texts: about 10 MB) instead of 3 n V floats
(SmolLM2's V = 49152: about 1.2 GB). The ``classes`` space always keeps its C class scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.models import EncodedBatch, ScoringModel


def model_outputs(model: ScoringModel, batch: EncodedBatch, prompt: nn.Module | None, space: str) -> torch.Tensor:
    """The outputs the transfer loss compares: answer-position logits (``vocab``) or class scores (``classes``)."""
    logits = model.answer_logits(batch, prompt)
    return model.class_scores(logits) if space == "classes" else logits


def trimmed(batch: EncodedBatch) -> EncodedBatch:
    """``batch`` without the columns that are padding in every row (right padding)."""
    width = int(batch.attention_mask.sum(1).max())
    return EncodedBatch(batch.input_ids[:, :width], batch.attention_mask[:, :width], batch.answer_index)


def top_k_tokens(s_prompted: torch.Tensor, s_plain: torch.Tensor, t_plain: torch.Tensor, k: int,
                 temperature: float) -> torch.Tensor:
    """Per row the k vocabulary ids with the largest of the three target-side probabilities (module docstring)."""
    def prob(z: torch.Tensor) -> torch.Tensor:
        return torch.softmax(z / temperature, dim=-1)

    score = torch.maximum(torch.maximum(prob(s_prompted), prob(s_prompted - s_plain)), prob(t_plain))
    return score.topk(k, dim=-1).indices.sort(dim=-1).values


@dataclass
class TransferTargets:
    """Per public text: the student's prompted and plain outputs and the teacher's plain outputs (rows
    in the order of the ``rows`` given to :func:`compute_targets`), restricted to ``index`` when set."""

    student_prompted: torch.Tensor  # n x m
    student_plain: torch.Tensor  # n x m
    teacher_plain: torch.Tensor  # n x m
    index: torch.Tensor | None  # n x k vocabulary ids of the m = k columns; None = every column
    student_class: torch.Tensor  # n, the student's plain class prediction
    teacher_class: torch.Tensor  # n, the teacher's plain class prediction
    kept_mass: float = 1.0  # mean share of softmax(s(x; P_s) / T) on the kept tokens

    def __len__(self) -> int:
        return self.student_prompted.shape[0]

    def rows(self, idx: torch.Tensor) -> "TransferTargets":
        return TransferTargets(self.student_prompted[idx], self.student_plain[idx], self.teacher_plain[idx],
                               None if self.index is None else self.index[idx], self.student_class[idx],
                               self.teacher_class[idx], self.kept_mass)

    def select(self, teacher_prompted: torch.Tensor) -> torch.Tensor:
        """The live teacher outputs at the kept columns (all of them when nothing was cut)."""
        return teacher_prompted if self.index is None else teacher_prompted.gather(1, self.index)

    def agreement(self) -> float:
        """Share of texts on which the student's and the teacher's plain class predictions agree."""
        return float((self.student_class == self.teacher_class).float().mean())


def compute_targets(student: ScoringModel, student_prompt: nn.Module, teacher: ScoringModel,
                    student_encoded: EncodedBatch, teacher_encoded: EncodedBatch, space: str, top_k: int,
                    temperature: float, batch_size: int, center_change: bool = False) -> TransferTargets:
    """The :class:`TransferTargets` of every row of the two encodings (the same texts), in batches of
    ``batch_size`` texts of similar length, without gradients; ``center_change``: the student's prompted
    outputs with the mean change over these texts removed (module docstring)."""
    n = len(student_encoded)
    order = student_encoded.attention_mask.sum(1).argsort(stable=True)  # similar lengths batch together
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("sp", "s0", "t0", "index", "sc", "tc", "mass")}
    change_sum = None  # the sum over texts of the whole change s(x; P_s) - s(x), for center_change
    with torch.no_grad():
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            s_b, t_b = trimmed(student_encoded.rows(idx)), trimmed(teacher_encoded.rows(idx))
            s_p, s_0, t_0 = (student.answer_logits(s_b, student_prompt), student.answer_logits(s_b),
                             teacher.answer_logits(t_b))
            parts["sc"].append(student.class_scores(s_0).argmax(-1))
            parts["tc"].append(teacher.class_scores(t_0).argmax(-1))
            if space == "classes":
                s_p, s_0, t_0 = student.class_scores(s_p), student.class_scores(s_0), teacher.class_scores(t_0)
            if center_change:
                part = change_of(s_p, s_0, temperature).sum(0)
                change_sum = part if change_sum is None else change_sum + part
            if space != "classes" and 0 < top_k < s_p.shape[-1]:
                index = top_k_tokens(s_p, s_0, t_0, top_k, temperature)
                parts["mass"].append(torch.softmax(s_p / temperature, -1).gather(1, index).sum(-1))
                parts["index"].append(index)
                s_p, s_0, t_0 = s_p.gather(1, index), s_0.gather(1, index), t_0.gather(1, index)
            parts["sp"].append(s_p)
            parts["s0"].append(s_0)
            parts["t0"].append(t_0)
    back = order.argsort()  # from length order back to the rows' order

    def cat(key: str) -> torch.Tensor | None:
        return torch.cat(parts[key])[back] if parts[key] else None

    mass, s_p, s_0, index = cat("mass"), cat("sp"), cat("s0"), cat("index")
    if change_sum is not None:
        mean = change_sum / n
        # s(x) + (Δ_s(x) - m): with log-softmax changes, so a constant a text adds to all its logits cancels
        s_p = s_0 + change_of(s_p, s_0, temperature) - (mean.expand_as(s_0) if index is None else mean[index])
    return TransferTargets(s_p, s_0, cat("t0"), index, cat("sc"), cat("tc"),
                           1.0 if mass is None else float(mass.mean()))


def change_of(prompted: torch.Tensor, plain: torch.Tensor, temperature: float) -> torch.Tensor:
    """Δ = the prompt's change of the output, as a difference of log-softmaxes at ``temperature`` (times T, so
    it is in logit units): invariant to a constant added to all of one text's logits."""
    return temperature * (torch.log_softmax(prompted / temperature, -1) - torch.log_softmax(plain / temperature, -1))

