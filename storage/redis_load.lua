-- redis_load.lua: reads one scope in one atomic step, run by the Redis server (storage/redis.c
-- sends it with EVALSHA, or EVAL after a NOSCRIPT reply; embedded at build time).
--
-- KEYS: the same five as storage/redis_cas.lua; this script reads 1 (version) and 2 (data).
-- Reply: {VERSION, HGETALL}: the version as a decimal string ("0" for a new scope) and the
-- document as flat key/value pairs (values are JSON text).

return {redis.call('GET', KEYS[1]) or '0', redis.call('HGETALL', KEYS[2])}
