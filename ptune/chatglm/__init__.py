"""ChatGLM2-6B / ChatGLM3-6B support."""
