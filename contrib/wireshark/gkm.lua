-- Wireshark dissector for gkm, wire version 4 (RFC-notes/wire-format.md).
--
--   wireshark -X lua_script:contrib/wireshark/gkm.lua capture.pcap
--   tshark -X lua_script:contrib/wireshark/gkm.lua -r capture.pcap -Y gkm -T json
--
-- Every message has the 12-byte header: "GK", version, type, group. Datagrams (rekeys,
-- heartbeats, data frames, fan-out subscriptions and cookies) are UDP, found on the default
-- ports (47701 rekeys, 47702 data) and by a heuristic on the header on any port; requests and
-- their answers (registration, welcome, resync, leave, error, acknowledgement) are TCP frames,
-- each a 4-byte big-endian length and the message, found by the same heuristic.
-- The rekey datagram is decoded whole: covers, and every item (wrap, one-way link, advance) with
-- its opener and target nodes, delta-coded as the wire has them. Other messages show their fixed
-- fields; sealed and encrypted parts are shown as bytes.
-- Keep this file in step with wire/src: `gkm-server/tests/wireshark.rs` decodes captures of the
-- current code with it.

local VERSION = 4
local HEADER_LEN = 12
local SIGNATURE_LEN = 64

local types = {
    [1] = "registration request", [2] = "welcome", [3] = "rekey", [4] = "heartbeat",
    [5] = "resync request", [6] = "resync response", [7] = "leave", [8] = "error",
    [9] = "data", [10] = "subscribe", [11] = "cookie reply", [12] = "ack",
    [13] = "key announcement", [14] = "key chain request", [15] = "key chain",
}
local kinds = {
    [0] = "wrap under the opener's old key", [1] = "wrap under the opener's new key",
    [2] = "one-way link", [3] = "hash-forward advance",
}
local acked = { [1] = "lease renewed", [2] = "left" }
-- HPKE KEMs by their RFC 9180 identifier: the lengths of their public keys and encapsulations.
local kems = { [0x647a] = "X-Wing (ML-KEM-768 + X25519)", [0x0020] = "DHKEM(X25519, HKDF-SHA256)" }
local kem_public_len = { [0x647a] = 1216, [0x0020] = 32 }
local kem_encapped_len = { [0x647a] = 1120, [0x0020] = 32 }

local gkm = Proto("gkm", "gkm group key management")
local f = gkm.fields
f.magic = ProtoField.string("gkm.magic", "Magic")
f.version = ProtoField.uint8("gkm.version", "Wire version")
f.type = ProtoField.uint8("gkm.type", "Type", base.DEC, types)
f.group = ProtoField.uint64("gkm.group", "Group")
f.epoch = ProtoField.uint64("gkm.epoch", "Epoch")
f.salt = ProtoField.bytes("gkm.salt", "Rekey salt")
f.kcv = ProtoField.bytes("gkm.kcv", "Key check value")
f.index = ProtoField.uint32("gkm.index", "Datagram index")
f.count = ProtoField.uint32("gkm.count", "Datagrams in the epoch")
f.seeds = ProtoField.bool("gkm.seeds", "Wraps carry one-way seeds")
f.cover_count = ProtoField.uint32("gkm.cover_count", "Covers")
f.cover = ProtoField.uint32("gkm.cover", "Cover node")
f.item_count = ProtoField.uint32("gkm.item_count", "Items")
f.wrap_count = ProtoField.uint32("gkm.wrap_count", "Wraps")
f.item_kind = ProtoField.uint8("gkm.item.kind", "Kind", base.DEC, kinds)
f.opener = ProtoField.uint32("gkm.item.opener", "Opener node")
f.target = ProtoField.uint32("gkm.item.target", "Target node")
f.wrapped = ProtoField.bytes("gkm.item.wrapped", "Wrapped key")
f.signature = ProtoField.bytes("gkm.signature", "Signature")
f.timestamp = ProtoField.uint64("gkm.timestamp_ms", "Timestamp (ms)")
f.member = ProtoField.uint64("gkm.member", "Member")
f.identity = ProtoField.bytes("gkm.identity", "Identity key")
f.kem = ProtoField.uint16("gkm.kem", "HPKE KEM", base.HEX, kems)
f.hpke_key = ProtoField.bytes("gkm.hpke_key", "HPKE key")
f.nonce = ProtoField.bytes("gkm.nonce", "Nonce")
f.token = ProtoField.bytes("gkm.token", "Enrollment token")
f.encapped = ProtoField.bytes("gkm.encapped", "HPKE encapsulated key")
f.sealed = ProtoField.bytes("gkm.sealed", "Sealed path keys")
f.status = ProtoField.uint16("gkm.status", "Status")
f.reason = ProtoField.string("gkm.reason", "Reason")
f.acked = ProtoField.uint8("gkm.acked", "Acknowledged", base.DEC, acked)
f.sender = ProtoField.uint32("gkm.sender", "Sender")
f.seq = ProtoField.uint64("gkm.seq", "Sequence number")
f.ciphertext = ProtoField.bytes("gkm.ciphertext", "Ciphertext")
f.body = ProtoField.bytes("gkm.body", "Body")
f.key_id = ProtoField.uint32("gkm.key_id", "Signing key number")
f.grace = ProtoField.uint32("gkm.grace_epochs", "Grace (epochs)")
f.signing_key = ProtoField.bytes("gkm.signing_key", "Signing key (Ed25519)")
f.links = ProtoField.uint8("gkm.links", "Announcements")

local ef_malformed = ProtoExpert.new("gkm.malformed", "Malformed gkm message",
    expert.group.MALFORMED, expert.severity.ERROR)
gkm.experts = { ef_malformed }

-- A varint at `offset`: its value (a Lua number: every field fits 2^53) and length, or nil.
local function varint(buf, offset)
    local value, scale = 0, 1
    for i = 0, 9 do
        if offset + i >= buf:len() then return nil end
        local byte = buf(offset + i, 1):uint()
        value = value + (byte % 128) * scale
        scale = scale * 128
        if byte < 128 then return value, i + 1 end
    end
    return nil
end

local function unzigzag(z)
    if z % 2 == 0 then return z / 2 end
    return -(z + 1) / 2
end

local function header_ok(buf, offset)
    return buf:len() >= offset + HEADER_LEN
        and buf(offset, 2):string() == "GK"
        and buf(offset + 2, 1):uint() == VERSION
        and types[buf(offset + 3, 1):uint()] ~= nil
end

local function signature(buf, tree, offset)
    if buf:len() - offset == SIGNATURE_LEN then
        tree:add(f.signature, buf(offset, SIGNATURE_LEN))
    else
        tree:add_proto_expert_info(ef_malformed, "no signature where one belongs")
    end
end

-- Whether `n` bytes from `offset` are there: every length read from the wire is checked with
-- it before a range is taken (a short range is a malformed message, not a Lua error).
local function has(buf, offset, n)
    return n >= 0 and offset + n <= buf:len()
end

local function rekey(buf, tree)
    local o = HEADER_LEN
    if not has(buf, o, 32) then return false end
    tree:add(f.epoch, buf(o, 8)); o = o + 8
    tree:add(f.salt, buf(o, 16)); o = o + 16
    tree:add(f.kcv, buf(o, 8)); o = o + 8
    local v, n = varint(buf, o); if not v then return false end
    tree:add(f.index, buf(o, n), v); o = o + n
    local count; count, n = varint(buf, o); if not count then return false end
    tree:add(f.count, buf(o, n), count); o = o + n
    if not has(buf, o, 1) then return false end
    tree:add(f.seeds, buf(o, 1), buf(o, 1):uint() == 1); o = o + 1
    local covers; covers, n = varint(buf, o); if not covers then return false end
    local ctree = tree:add(f.cover_count, buf(o, n), covers); o = o + n
    local previous = 0
    for _ = 1, covers do
        local z; z, n = varint(buf, o); if not z then return false end
        previous = previous + unzigzag(z)
        ctree:add(f.cover, buf(o, n), previous); o = o + n
    end
    local items; items, n = varint(buf, o); if not items then return false end
    local itree = tree:add(f.item_count, buf(o, n), items); o = o + n
    local opener, target, wraps = 0, nil, 0
    for i = 1, items do
        local start = o
        local head; head, n = varint(buf, o); if not head then return false end
        o = o + n
        local kind = head % 4
        local new_target = math.floor(head / 4) % 2 == 1
        opener = opener + unzigzag(math.floor(head / 8))
        local t_start, t_len
        if new_target then
            local t; t, n = varint(buf, o); if not t then return false end
            target, t_start, t_len = t, o, n
            o = o + n
        end
        local ct
        if kind <= 1 then
            if not has(buf, o, 32) then return false end
            ct = buf(o, 32); o = o + 32
            wraps = wraps + 1
        end
        local item = itree:add(gkm, buf(start, o - start), "Item " .. i .. ": " .. kinds[kind])
        item:add(f.item_kind, kind)
        item:add(f.opener, buf(start, 1), opener)
        if kind ~= 3 then
            if target == nil then return false end
            if t_start then item:add(f.target, buf(t_start, t_len), target)
            else item:add(f.target, target):set_generated() end
        end
        if ct then item:add(f.wrapped, ct) end
    end
    tree:add(f.wrap_count, wraps):set_generated()
    signature(buf, tree, o)
    return true
end

local function fixed(buf, tree, o, fields)
    for _, field in ipairs(fields) do
        if not has(buf, o, field[2]) then return nil end
        tree:add(field[1], buf(o, field[2]))
        o = o + field[2]
    end
    return o
end

-- A KEM identifier at `o` and the key (`lengths` = kem_public_len) or encapsulation
-- (kem_encapped_len) of its length as `field`; the offset after them, or nil.
local function kem_and(buf, tree, o, lengths, field)
    if not has(buf, o, 2) then return nil end
    local len = lengths[buf(o, 2):uint()]
    if len == nil or not has(buf, o + 2, len) then return nil end
    tree:add(f.kem, buf(o, 2))
    tree:add(field, buf(o + 2, len))
    return o + 2 + len
end

-- Dissects one message starting at `offset` (to the end of `buf`); false if malformed.
local function message(buf, pinfo, tree, offset)
    local msg = buf(offset):tvb()
    local ty = msg(3, 1):uint()
    local sub = tree:add(gkm, msg(), "gkm " .. types[ty])
    sub:add(f.magic, msg(0, 2))
    sub:add(f.version, msg(2, 1))
    sub:add(f.type, msg(3, 1))
    sub:add(f.group, msg(4, 8))
    pinfo.cols.protocol = "GKM"
    local info = types[ty]
    local ok = true
    if ty == 3 then
        ok = rekey(msg, sub)
        if ok then info = info .. ", epoch " .. tostring(msg(HEADER_LEN, 8):uint64()) end
    elseif ty == 4 then
        local o = fixed(msg, sub, HEADER_LEN, { { f.epoch, 8 }, { f.kcv, 8 }, { f.timestamp, 8 } })
        ok = o ~= nil
        if ok then
            signature(msg, sub, o)
            info = info .. ", epoch " .. tostring(msg(HEADER_LEN, 8):uint64())
        end
    elseif ty == 1 then
        local o = fixed(msg, sub, HEADER_LEN, { { f.identity, 32 } })
        o = o and kem_and(msg, sub, o, kem_public_len, f.hpke_key)
        o = o and fixed(msg, sub, o, { { f.timestamp, 8 }, { f.nonce, 16 } })
        ok = o ~= nil and has(msg, o, 1) and has(msg, o + 1, msg(o, 1):uint())
        if ok then
            local len = msg(o, 1):uint()
            sub:add(f.token, msg(o + 1, len))
            signature(msg, sub, o + 1 + len)
        end
    elseif ty == 2 or ty == 6 then
        local o = fixed(msg, sub, HEADER_LEN, { { f.member, 8 }, { f.epoch, 8 }, { f.nonce, 16 } })
        o = o and kem_and(msg, sub, o, kem_encapped_len, f.encapped)
        ok = o ~= nil and has(msg, o, 1)
        if ok then
            local family = msg(o, 1):uint()
            o = o + 1 + (family == 4 and 6 or (family == 6 and 18 or 0))
            ok = has(msg, o, 2) and has(msg, o + 2, msg(o, 2):uint())
        end
        if ok then
            local len = msg(o, 2):uint()
            sub:add(f.sealed, msg(o + 2, len))
            signature(msg, sub, o + 2 + len)
        end
    elseif ty == 5 then
        local o = fixed(msg, sub, HEADER_LEN, { { f.member, 8 }, { f.epoch, 8 }, { f.kcv, 8 },
            { f.timestamp, 8 }, { f.nonce, 16 } })
        o = o and kem_and(msg, sub, o, kem_public_len, f.hpke_key)
        ok = o ~= nil
        if ok then signature(msg, sub, o) end
    elseif ty == 7 then
        local o = fixed(msg, sub, HEADER_LEN, { { f.member, 8 }, { f.timestamp, 8 }, { f.nonce, 16 } })
        ok = o ~= nil
        if ok then signature(msg, sub, o) end
    elseif ty == 8 then
        ok = has(msg, HEADER_LEN, 4) and has(msg, HEADER_LEN + 4, msg(HEADER_LEN + 2, 2):uint())
        if ok then
            sub:add(f.status, msg(HEADER_LEN, 2))
            local len = msg(HEADER_LEN + 2, 2):uint()
            sub:add(f.reason, msg(HEADER_LEN + 4, len))
            info = info .. " " .. msg(HEADER_LEN, 2):uint()
        end
    elseif ty == 12 then
        ok = fixed(msg, sub, HEADER_LEN, { { f.member, 8 }, { f.acked, 1 }, { f.nonce, 16 },
            { f.epoch, 8 } }) ~= nil
    elseif ty == 13 then
        local o = fixed(msg, sub, HEADER_LEN, { { f.key_id, 4 }, { f.epoch, 8 }, { f.grace, 4 },
            { f.timestamp, 8 }, { f.signing_key, 32 } })
        ok = o ~= nil
        if ok then
            signature(msg, sub, o)
            info = info .. ", key " .. msg(HEADER_LEN, 4):uint()
        end
    elseif ty == 14 then
        ok = fixed(msg, sub, HEADER_LEN, { { f.signing_key, 32 }, { f.nonce, 16 } }) ~= nil
    elseif ty == 15 then
        local o = fixed(msg, sub, HEADER_LEN, { { f.nonce, 16 }, { f.links, 1 } })
        ok = o ~= nil and has(msg, o, msg(o - 1, 1):uint() * 132)
        if ok then info = info .. ", " .. msg(o - 1, 1):uint() .. " announcements" end
    elseif ty == 9 then
        local o = fixed(msg, sub, HEADER_LEN, { { f.epoch, 8 }, { f.sender, 4 }, { f.seq, 8 } })
        ok = o ~= nil and has(msg, o, 2) and has(msg, o + 2, msg(o, 2):uint())
        if ok then
            local len = msg(o, 2):uint()
            sub:add(f.ciphertext, msg(o + 2, len))
        end
    else
        if msg:len() > HEADER_LEN then sub:add(f.body, msg(HEADER_LEN)) end
    end
    if not ok then sub:add_proto_expert_info(ef_malformed) end
    pinfo.cols.info = "gkm " .. info
    return true
end

local function datagram(buf, pinfo, tree)
    if not header_ok(buf, 0) then return 0 end
    message(buf, pinfo, tree, 0)
    return buf:len()
end

gkm.dissector = datagram

local function heuristic_udp(buf, pinfo, tree)
    if not header_ok(buf, 0) then return false end
    message(buf, pinfo, tree, 0)
    return true
end

-- TCP: frames of a 4-byte length and a message.
local function frame_len(buf, pinfo, offset)
    return buf(offset, 4):uint() + 4
end

local function frame(buf, pinfo, tree)
    if header_ok(buf, 4) then message(buf, pinfo, tree, 4) end
    return buf:len()
end

local function heuristic_tcp(buf, pinfo, tree)
    if buf:len() < 4 + HEADER_LEN or not header_ok(buf, 4) then return false end
    dissect_tcp_pdus(buf, tree, 4, frame_len, frame)
    return true
end

DissectorTable.get("udp.port"):add(47701, gkm)
DissectorTable.get("udp.port"):add(47702, gkm)
gkm:register_heuristic("udp", heuristic_udp)
gkm:register_heuristic("tcp", heuristic_tcp)
