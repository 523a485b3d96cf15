"""Distillation losses: the math of every term in `functional` (small functions, one per term),
what a student's and a teacher's batch carry in `features`, and the one table of terms and
the recipes built from it in `registry` (docs/losses.md gives each term's formula)."""
