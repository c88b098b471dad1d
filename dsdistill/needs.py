"""`Needs`: what a component reads from the two forwards. A leaf module: components declare it, teachers
and the student's forward produce what it names."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Needs:
    """What a component reads besides the labels (the union over the active components is what runs)."""

    teacher_logits: bool = False
    """The teacher's distribution over the vocabulary (dense logits, or its final hidden state and head)."""
    student_hidden: bool = False
    """Every hidden state of the student (embeddings first, then one per block)."""
    teacher_hidden: bool = False
    """Every hidden state of the teacher."""
    teacher_pooled: bool = False
    """The teacher's final hidden state mean-pooled over each sequence's loss-bearing positions."""
    student_qk: frozenset[int] = frozenset()
    """1-based student layers whose post-RoPE queries and keys are captured."""
    teacher_qk: frozenset[int] = frozenset()
    """1-based teacher layers whose post-RoPE queries and keys are captured."""

    def __or__(self, other: "Needs") -> "Needs":
        return Needs(
            teacher_logits=self.teacher_logits or other.teacher_logits,
            student_hidden=self.student_hidden or other.student_hidden,
            teacher_hidden=self.teacher_hidden or other.teacher_hidden,
            teacher_pooled=self.teacher_pooled or other.teacher_pooled,
            student_qk=self.student_qk | other.student_qk,
            teacher_qk=self.teacher_qk | other.teacher_qk,
        )
