"""Executors run stage work — in this process or on Ray — behind one `Executor` protocol; `streaming`
drives data-parallel shards through the layers. No linear algebra here."""
