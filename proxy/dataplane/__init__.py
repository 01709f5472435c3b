"""The forwarding path: context, flag resolution, header fitting, upstream, one Exchange per request."""
