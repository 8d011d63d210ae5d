"""RAG baseline: the k profile items a retriever ranks first, in LongLaMP's prompt, zero-shot."""

from flythinker.methods.lm import LMMethod


class RAG(LMMethod):
    name = "rag"
    style = "rag"
