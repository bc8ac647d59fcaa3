"""Guided classroom lessons: steps with commands and checkpoints, shipped as data (data/*.toml).

model.py reads and checks a lesson file, facts.py turns this run's requests into the numbers an
explanation names, runner.py walks a live session through the steps (and runs the commands
itself with --auto). The lab's pane is buselab/ui/lesson.py; the command is commands/lesson.py.
"""

from .model import Checkpoint, Lesson, LessonError, Step, builtin_paths, find_lesson, load_lesson
from .runner import LessonRunner, run_auto

__all__ = [
    "Checkpoint",
    "Lesson",
    "LessonError",
    "LessonRunner",
    "Step",
    "builtin_paths",
    "find_lesson",
    "load_lesson",
    "run_auto",
]
