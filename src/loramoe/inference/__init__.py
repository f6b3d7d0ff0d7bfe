"""Running a loaded model: batched generation, prompt files and the interactive chat (``generate``)."""
