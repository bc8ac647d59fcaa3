"""Filters: nbdkit-style layers stacked over any backend, given on the CLI or added live.

    --filter delay:read=5ms,write=10ms     --filter delay:random=1ms-20ms
    --filter error:rate=0.1,errno=EIO,op=read
    --filter error:range=0-1M,errno=ENOSPC,op=write
    --filter throttle:mbps=10,iops=500     --filter readonly     --filter cache

A spec is NAME[:KEY=VALUE[,KEY=VALUE...]]. Filters given first sit lowest
(nearest the backend), as with nbdkit's --filter. Each filter module's
docstring lists its keys; `storage.registry.parse_filter_spec` makes one.
"""
