"""Text: tokenizer and streaming detokenizer, chat templates, tool-call parsing."""
