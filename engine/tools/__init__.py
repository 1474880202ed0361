"""Tool calling in one text format: tools described in the prompt, calls written as
``<tool_call>[{"name": ..., "arguments": {...}}]</tool_call>`` (SmolLM2's format; one bare object inside the tags,
as Hermes-style models write it, parses too), results fed back as ``<tool_response>`` turns.

``prompt`` renders tool definitions and tool turns for a chat template, ``parser`` reads calls out of generated text
(whole or streamed), ``constraint`` builds the grammar that forces a call when ``tool_choice`` demands one.
"""
