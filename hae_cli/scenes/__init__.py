"""The scene world: seeded images of several labelled objects, questions with one right answer
(by type), captions and conversations, written as `hae eval`'s JSONL (`scripts/make_scenes.py`)."""

from hae_cli.scenes.dataset import TASKS, SceneItem, make_item, write_jsonl
from hae_cli.scenes.questions import QUESTION_TYPES, SceneQuestion, caption, vocabulary
from hae_cli.scenes.world import CROP_CHOICES, Scene, SceneObject, make_scene, max_objects

__all__ = ["CROP_CHOICES", "QUESTION_TYPES", "TASKS", "Scene", "SceneItem", "SceneObject", "SceneQuestion", "caption",
           "make_item", "make_scene", "max_objects", "vocabulary", "write_jsonl"]
