#!/usr/bin/env python3
# Writes the named seed inputs of fuzz/corpus/<target>/ (small, real inputs: commands, DATA with
# the smuggling variants, configs, journal segments, envelopes, server replies). Files added later
# (crashes, inputs found by a campaign) are left alone. Run from anywhere: python3 fuzz/make_seeds.py
import struct, zlib, os, json
os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'corpus'))
def put(target, name, data):
    os.makedirs(target, exist_ok=True)
    if isinstance(data, str): data = data.encode()
    open(f'{target}/{name}', 'wb').write(data)

# command_parser: one command line without its CRLF.
cmds = {
 'ehlo': 'EHLO client.example.test',
 'helo': 'HELO client',
 'ehlo-literal': 'EHLO [192.0.2.7]',
 'ehlo-literal-v6': 'EHLO [IPv6:2001:db8::7]',
 'mail-params': 'MAIL FROM:<alice@sender.test> SIZE=10240 BODY=8BITMIME RET=HDRS ENVID=QQ+2B314159 SMTPUTF8',
 'mail-null': 'MAIL FROM:<>',
 'mail-quoted': 'MAIL FROM:<"quoted \\" local"@sender.test>',
 'mail-utf8': 'MAIL FROM:<jos\u00e9@exampl\u00e9.test> SMTPUTF8',
 'mail-lowercase-space': 'mail from: <a@b.test>',
 'rcpt-dsn': 'RCPT TO:<bob@example.test> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;bob+40example.test',
 'rcpt-never': 'RCPT TO:<bob@example.test> NOTIFY=NEVER',
 'rcpt-source-route': 'RCPT TO:<@relay.test,@hop.test:bob@example.test>',
 'rcpt-postmaster': 'RCPT TO:<Postmaster>',
 'data': 'DATA', 'rset': 'RSET', 'quit': 'QUIT', 'noop': 'NOOP hello', 'help': 'HELP',
 'starttls': 'STARTTLS', 'vrfy': 'VRFY postmaster', 'etrn': 'ETRN example.test',
 'etrn-hash': 'ETRN #example.test', 'etrn-at': 'ETRN @example.test', 'bdat': 'BDAT 100 LAST',
 'auth': 'AUTH PLAIN AGFsaWNlAHNlY3JldA==', 'tab': 'NOOP\tx',
}
for k, v in cmds.items(): put('command_parser', k, v)

# data_reader: what follows DATA, up to and past the end of data.
pipelined = b'MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nFrom: ceo@example.test\r\n\r\nsmuggled\r\n'
put('data_reader', 'plain', b'Received: from client.test\r\nFrom: a@sender.test\r\nSubject: hi\r\n\r\nbody\r\n.\r\n')
put('data_reader', 'dot-stuffed', b'Subject: dots\r\n\r\n..leading dot\r\n...two\r\n.\r\nQUIT\r\n')
put('data_reader', 'empty', b'.\r\n')
put('data_reader', 'headers-only', b'Subject: x\r\n.\r\n')
put('data_reader', 'received-loop', b''.join(b'Received: from hop%d.test\r\n' % i for i in range(60)) + b'\r\nloop\r\n.\r\n')
put('data_reader', 'folded-header', b'Subject: a\r\n b\r\n\tc\r\nX: y\r\n\r\nbody\r\n.\r\n')
put('data_reader', 'long-line', b'Subject: long\r\n\r\n' + b'x' * 1200 + b'\r\n.\r\n')
put('data_reader', 'binary', b'Subject: 8bit\r\n\r\n\xc3\xa9t\xc3\xa9 \x00\xff\r\n.\r\n')
for name, end in [('lf-dot-lf', b'\n.\n'), ('cr-dot-cr', b'\r.\r'), ('lf-dot-crlf', b'\n.\r\n'),
                  ('crlf-dot-lf', b'\r\n.\n'), ('cr-dot-crlf', b'\r.\r\n'), ('crlf-dot-cr', b'\r\n.\r')]:
    put('data_reader', 'smuggle-' + name, b'From: a@sender.test\r\n\r\nbody' + end + pipelined + b'.\r\nQUIT\r\n')
put('data_reader', 'bare-lf-body', b'Subject: x\r\n\r\nline\nother\r\n.\r\n')

# config_loader: the packaged config and small variants.
put('config_loader', 'packaged.toml', open('../../packaging/bartleby.toml', 'rb').read())
put('config_loader', 'minimal.toml', 'hostname = "mx.test"\n[smtp]\nlisten = ["127.0.0.1:25"]\nmax_sessions_per_ip = 3\n')
put('config_loader', 'routes.toml', '[queue]\nretry_interval = "1h30m"\nmax_lifetime = "5d"\n[routes]\n"a.test" = "[::1]:25"\n"b.test" = "primary.b.test:2525"\n')
put('config_loader', 'domains.toml', '[domain."a.test"]\ncallout = true\nunknown_recipient = "hold"\nrecipients_file = "/etc/bartleby/a.test.recipients"\n[web]\nallow = ["10.0.0.0/8", "::1/128"]\n')
put('config_loader', 'unknown-field.toml', 'hostname = "mx.test"\n[smtp]\nlisten = ["127.0.0.1:25"]\nno_such_key = 1\n')

# journal_replay: a flags octet (1: fix CRCs, 2: two segments), then segment octets.
def rec(kind, qid, env=b'', body=b'', crc=True):
    head = bytes([kind]) + qid.encode() + struct.pack('<IQ', len(env), len(body))
    c = zlib.crc32(head + env + body) & 0xffffffff if crc else 0
    return b'BJR1' + head + struct.pack('<I', c) + env + body
fixture = open('../../tests/fixtures/spool-journal-v1/journal/0000000000000001.wal', 'rb').read()
put('journal_replay', 'fixture-v1', b'\x00' + fixture)
put('journal_replay', 'fixture-v1-two-segments', b'\x02' + fixture)
put('journal_replay', 'fixture-v1-torn', b'\x00' + fixture[:1500])
def env(qid, **kw):
    e = {"version": 1, "id": qid, "sender": "a@sender.test", "recipients": [{"address": "b@example.test", "status": "pending"}],
         "arrived": 1795971294611991, "size": 20, "attempts": 0, "next_attempt": 1795971294611991}
    e.update(kw)
    return json.dumps(e, separators=(',', ':')).encode()
A, B = '6616D270AC997000', '6616D270AC997001'
body = b'Subject: x\r\n\r\nhi\r\n'
put('journal_replay', 'small-crc-to-fix', b'\x01' + rec(1, A, env(A), body, crc=False) + rec(2, A, crc=False))
put('journal_replay', 'forget-then-requeued', b'\x02' + rec(1, A, env(A), body) + rec(2, A) + rec(1, A, env(A, attempts=1), body) + rec(1, B, env(B), body))
put('journal_replay', 'update-in-newer-segment', b'\x03' + rec(1, A, env(A), body) + rec(1, B, env(B), body) + rec(3, A, env(A, held=True)) + rec(2, B))
put('journal_replay', 'update-without-message', b'\x00' + rec(3, A, env(A)) + rec(1, B, b'{not json', body))
put('journal_replay', 'bad-id-and-kind', b'\x01' + rec(1, B, env(B), body) + rec(9, A, env(A), body) + rec(1, 'zzzzzzzzzzzzzzzz', b'{}', b''))

# envelope_decoder: envelope JSON as in .env files, journal records and queue exports.
for f in sorted(os.listdir('../../tests/fixtures/spool-v1/messages')):
    if f.endswith('.env'):
        put('envelope_decoder', 'spool-v1-' + f, open('../../tests/fixtures/spool-v1/messages/' + f, 'rb').read())
at = 0
while at < len(fixture):
    el, bl = struct.unpack('<IQ', fixture[at+21:at+33])
    if fixture[at+4] == 3:
        put('envelope_decoder', 'journal-v1-updated', fixture[at+37:at+37+el])
    at += 37 + el + bl
put('envelope_decoder', 'notice', json.dumps({"version": 1, "id": "6616D270AC997002", "sender": "", "recipients": [
    {"address": "a@sender.test", "status": "pending", "notify": ["NEVER"]}], "body": "8BITMIME", "smtputf8": True,
    "client_ip": None, "helo": "", "arrived": 1795971294611991, "size": 1800, "attempts": 0,
    "next_attempt": 1795971294611991, "generated": True, "history": []}))
put('envelope_decoder', 'full', json.dumps({"version": 1, "id": "6616D270AC997003", "sender": "jos\u00e9@exampl\u00e9.test",
    "recipients": [
        {"address": "b@example.test", "status": "failed", "notify": ["FAILURE", "DELAY"], "orcpt": "rfc822;b+40example.test",
         "last_error": "RCPT TO:<b@example.test>: 550 5.1.1 no such user", "remote_mta": "primary.example.test"},
        {"address": "c@EXAMPLE.test.", "status": "pending", "last_error": "connect to 192.0.2.1:25: Connection refused"},
        {"address": "d@example.test", "status": "delivered", "notify": ["SUCCESS"]}],
    "ret": "FULL", "envid": "QQ314159", "body": "BINARYMIME", "smtputf8": True, "client_ip": "2001:db8::7",
    "helo": "[IPv6:2001:db8::7]", "arrived": 1795971294611991, "size": 391, "attempts": 7,
    "next_attempt": 1796971294611991, "held": False, "delay_notified": True, "generated": False,
    "history": [{"at": 1795971294611992, "event": "received from client [2001:db8::7]"}],
    "sender_auth": {"spf": "softfail", "dkim_aligned": False, "dkim_domain": "sender.test"}, "bounce_suppressed": True},
    ensure_ascii=False))

# reply_parser: what a next hop sends, as read by the SMTP client.
replies = {
 'greeting': b'220 primary.example.test ESMTP Postfix (Debian/GNU)\r\n',
 'ehlo-postfix': b'250-primary.example.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-VRFY\r\n250-ETRN\r\n250-STARTTLS\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250-SMTPUTF8\r\n250 CHUNKING\r\n',
 'ehlo-size-0-lowercase': b'250-mx.test greets you\r\n250-size 0\r\n250-starttls\r\n250 AUTH PLAIN LOGIN\r\n',
 'pipelined-envelope': b'250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 <x@example.test>: Recipient address rejected\r\n354 End data with <CR><LF>.<CR><LF>\r\n',
 'multiline-550': b'550-5.1.1 The email account that you tried to reach does not exist.\r\n550-5.1.1 Please try double-checking the recipient\'s email address.\r\n550 5.1.1 https://support.example.test/mail/?p=NoSuchUser\r\n',
 'tempfail-421': b'421 4.7.0 primary.example.test Error: too many connections\r\n',
 'class-mismatch': b'250 5.1.1 odd but ok\r\n',
 'bare-lf': b'250-first\n250 last\n',
 'no-text': b'354\r\n250\r\n',
 'unterminated': b'250-more to come\r\n',
 'garbage': b'hello\r\n',
 'after-data': b'250 2.0.0 Ok: queued as 4Fz1Yq0Z3Lz9sWd\r\n221 2.0.0 Bye\r\n',
 'utf8': b'550 5.1.1 \xc3\xa9chec <jos\xc3\xa9@exampl\xc3\xa9.test>\r\n',
 'invalid-utf8': b'451 4.3.0 \xff\xfe temporary\r\n',
}
for k, v in replies.items(): put('reply_parser', k, v)

# proxy_header: what a load balancer in smtp.proxy_from sends first (HAProxy's proxy-protocol.txt).
V2_SIG = b'\r\n\r\n\x00\r\nQUIT\n'
def v2(command, family, block): return V2_SIG + bytes([0x20 | command, family]) + struct.pack('>H', len(block)) + block
inet = bytes([192, 0, 2, 77, 198, 51, 100, 3]) + struct.pack('>HH', 56324, 25)
inet6 = bytes.fromhex('20010db8000000000000000000000077' '20010db8000000000000000000000003') + struct.pack('>HH', 4000, 25)
headers = {
 'v1-tcp4': b'PROXY TCP4 192.0.2.77 198.51.100.3 56324 25\r\nEHLO client.test\r\n',
 'v1-tcp6': b'PROXY TCP6 2001:db8::77 2001:db8::3 4000 25\r\n',
 'v1-unknown': b'PROXY UNKNOWN\r\n',
 'v1-bare-lf': b'PROXY TCP4 192.0.2.77 198.51.100.3 56324 25\n',
 'v2-inet': v2(1, 0x11, inet),
 'v2-inet6-tlvs': v2(1, 0x21, inet6 + b'\x02\x00\x07mx.test' + b'\x04\x00\x00') + b'EHLO x\r\n',
 'v2-local': v2(0, 0x00, b''),
 'v2-unix': v2(1, 0x31, bytes(216)),
 'v2-short': v2(1, 0x11, inet[:8]),
 'smtp': b'EHLO client.test\r\n',
}
for k, v in headers.items(): put('proxy_header', k, v)
