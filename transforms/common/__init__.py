"""What every stage shares: the error vocabulary, counters, time formats, worker memory."""
