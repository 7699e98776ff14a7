-- wrk script for compare.sh: every request carries an `x-user-id` from a
-- fixed set of 10,000 users, in turn, so cyan's sticky hashing (configured
-- on that header in cyan.toml) hashes a key on every request and the split
-- stays ~50/50. The peers get the same requests; the header means nothing
-- to them. The requests are formatted once per thread, in init.
local reqs, n, i = {}, 10000, 0

function init(args)
    for u = 1, n do
        reqs[u] = wrk.format(nil, nil, { ["x-user-id"] = "user-" .. u })
    end
end

function request()
    i = i % n + 1
    return reqs[i]
end
