"""Data: LongLaMP loading (`longlamp`), prompts (`prompts`), retrieval (`retrieval`), batching (`collate`)."""
