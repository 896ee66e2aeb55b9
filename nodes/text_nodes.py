"""Infinity Text Encode: a prompt -> INFINITY_CONDITIONING (packed T5 features of that prompt)."""
from __future__ import annotations

from comfy_api.latest import io

from ..infinity_core import text_encoder as te
from .common import CATEGORY, Conditioning, InfinityConditioning, TextEncoder, fail, log, short
from .interrupt import interruptible


def token_report(cond: InfinityConditioning) -> str:
    """The line shown under the node (and kept in the prompt's history)."""
    if cond.truncated_tokens:
        return (f"⚠ prompt truncated: {cond.tokens + cond.truncated_tokens} tokens, T5 reads only the first "
                f"{te.MAX_LENGTH}; {cond.truncated_tokens} tokens were dropped")
    return f"{cond.tokens} tokens (of {te.MAX_LENGTH})"


class InfinityTextEncode(io.ComfyNode):
    NAME = "Infinity Text Encode"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InfinityTextEncode",
            display_name=cls.NAME,
            category=CATEGORY,
            description=(
                "Encodes a prompt with the T5 text encoder into Infinity conditioning (the unpadded T5 "
                "features the transformer attends to). Connect it to the sampler's positive input, or to "
                "negative for a negative prompt. T5 reads at most 512 tokens; a longer prompt is cut and "
                "the node reports how many tokens were dropped (also in the server log)."),
            inputs=[
                TextEncoder.Input("text_encoder", tooltip="The T5 encoder from Load Infinity Text Encoder."),
                io.String.Input(
                    "prompt", multiline=True, default="", dynamic_prompts=True,
                    tooltip=("What to draw, in plain English. Up to 512 T5 tokens (about 350 words); the rest "
                             "is dropped and reported. An empty prompt is allowed (just the end token).")),
            ],
            outputs=[Conditioning.Output("conditioning", display_name="conditioning",
                                         tooltip="The encoded prompt, for the Infinity sampler.")],
        )

    @classmethod
    def execute(cls, text_encoder, prompt: str) -> io.NodeOutput:
        node = cls.NAME
        try:
            # Cancel stops the T5 forward at the next layer (seconds for flan-t5-xl on a CPU)
            with interruptible(text_encoder.encoder.model):
                cond = text_encoder.encode(prompt)
        except (ValueError, OSError, RuntimeError) as e:
            fail(node, short(e), e)
        value = InfinityConditioning(cond=cond, prompt=prompt, tokens=int(cond.lens[0]),
                                     truncated_tokens=int(cond.truncated_tokens[0]), encoder=text_encoder.label)
        report = token_report(value)
        if value.truncated_tokens:
            log.warning("Infinity Text Encode: %s", report)
        # shown under the node by web/infinity.js and kept in the prompt's history (a plain dict: the
        # ui.PreviewText helper is not in every ComfyUI the pack supports)
        return io.NodeOutput(value, ui={"text": [report]})


NODES: list[type[io.ComfyNode]] = [InfinityTextEncode]
