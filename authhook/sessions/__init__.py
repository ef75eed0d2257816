"""Sessions: the part of the tenant boundary that lives in the broker - client ids and live sessions."""
