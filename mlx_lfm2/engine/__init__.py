"""Generation: sampling, the token loop, sessions. Knows token ids, not HTTP or terminals."""
