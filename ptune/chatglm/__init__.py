"""ChatGLM2-6B / ChatGLM3-6B without remote code.

- :mod:`ptune.chatglm.tokenizer` -- the SentencePiece tokenizer with ChatGLM's command and role
  tokens, ChatGLM2 ``build_prompt`` and ChatGLM3 ``build_chat_input`` (``load_tokenizer(dir)``).
- :mod:`ptune.chatglm.convert` -- the checkpoint as transformers' ``GlmForCausalLM``
  (``load_chatglm(dir, dtype, device)``).
- :mod:`ptune.chatglm.integrity` -- size/structure/SHA-256 checks of the downloaded files
  (``python -m ptune.verify_model <dir> [--full]``).
"""
