"""The paper's system prompt and answer format (LENS appendix, "Reasoning segmentation for LENS").

Everything that writes or reads the MLLM's text goes through this module, so the format the
base model is taught, the format R_format checks (eq. 11) and the format the parser reads are
the same by construction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

SYSTEM_PROMPT = "You are a helpful assistant."

# The user turn of the paper's appendix, with the referring expression filled in.
USER_TEMPLATE = (
    'Find the object that best matches "{query}" and provide its bounding box.\n'
    "Please:\n"
    "1. Analyze all objects in the image carefully\n"
    "2. Compare candidates against the target description\n"
    "3. Select the most closely matching object\n"
    "4. Provide precise bounding box coordinates\n"
    "Format your response as:\n"
    "<think>[Your step-by-step analysis and reasoning]</think>\n"
    '<answer>[{{"bbox_2d": [x1,y1,x2,y2], "label": "{query}"}}]</answer>'
)

# R_format's pattern: reasoning, then answer, nothing required between.
FORMAT_PATTERN = r"<think>.*?</think>\s*<answer>.*?</answer>"


def user_prompt(query: str) -> str:
    """The user instruction T of eq. 1 for one referring expression."""
    return USER_TEMPLATE.format(query=query)


def format_answer(rationale: str, box: Sequence[float], label: str) -> str:
    """The assistant turn the paper's appendix shows: `<think>CoT</think><answer>[json]</answer>`.

    `box` is (x1, y1, x2, y2) in pixels of the MLLM's (smart-resized) input image; it is
    rounded to integers as Qwen2.5-VL writes them.
    """
    coords = [int(round(float(v))) for v in box]
    payload = json.dumps([{"bbox_2d": coords, "label": label}])
    return f"<think>{rationale}</think>\n<answer>{payload}</answer>"


def chat_messages(query: str, image_placeholder: bool = True) -> list[dict]:
    """Chat-template messages (system + user with one image) for Qwen2.5-VL's processor."""
    content: list[dict] = [{"type": "image"}] if image_placeholder else []
    content.append({"type": "text", "text": user_prompt(query)})
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": content},
    ]
