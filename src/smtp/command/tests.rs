use super::*;
use crate::xtext::xtext_encode;

fn ok(line: &str) -> Command {
    parse(line.as_bytes()).unwrap_or_else(|err| panic!("{line:?}: {err}"))
}

fn err(line: &str) -> CommandError {
    parse(line.as_bytes()).expect_err(line)
}

#[test]
fn every_verb() {
    assert_eq!(ok("EHLO client.test"), Command::Ehlo("client.test".into()));
    assert_eq!(ok("helo [192.0.2.1]"), Command::Helo("[192.0.2.1]".into()));
    assert_eq!(ok("DATA"), Command::Data);
    assert_eq!(ok("rset"), Command::Rset);
    assert_eq!(ok("NOOP"), Command::Noop);
    assert_eq!(ok("NOOP anything goes"), Command::Noop);
    assert_eq!(ok("QUIT"), Command::Quit);
    assert_eq!(ok("VRFY alice"), Command::Vrfy("alice".into()));
    assert_eq!(ok("HELP"), Command::Help);
    assert_eq!(ok("HELP MAIL"), Command::Help);
    assert_eq!(ok("STARTTLS"), Command::StartTls);
    assert_eq!(ok("EXPN staff"), Command::NotImplemented("EXPN".into()));
    assert_eq!(
        ok("Mail From:<a@b.test>"),
        Command::Mail(MailFrom { address: "a@b.test".into(), ..MailFrom::default() })
    );
    assert_eq!(ok("RCPT TO:<c@d.test>"), Command::Rcpt(RcptTo { address: "c@d.test".into(), ..RcptTo::default() }));
}

#[test]
fn unknown_and_bad_syntax() {
    assert_eq!(err("FOO bar"), CommandError::Unknown("FOO".into()));
    assert_eq!(err("").reply().code, 500);
    assert_eq!(err("FOO").reply().to_string(), "500 5.5.2 command unrecognized: FOO\r\n");
    for line in ["EHLO", "HELO", "EHLO a b", "EHLO (x)", "VRFY", "DATA now", "QUIT please", "STARTTLS x"] {
        let reply = err(line).reply();
        assert_eq!((reply.code, reply.enhanced), (501, Some("5.5.4")), "{line}");
    }
    for line in
        ["MAIL <a@b.test>", "MAIL FROM <a@b.test>", "MAIL FROM:<a@b.test", "MAIL FROM:<a@b.test>x", "MAIL FROM:"]
    {
        assert!(matches!(err(line), CommandError::Syntax(_)), "{line}");
    }
    assert!(matches!(err("RCPT TO:<>"), CommandError::Syntax(_)));
    assert!(matches!(parse(b"EHLO caf\xe9"), Err(CommandError::Syntax(_))));
    assert!(matches!(parse(b"NOOP a\rb"), Err(CommandError::Syntax(_))));
}

#[test]
fn mail_parameters() {
    let Command::Mail(mail) = ok("MAIL FROM:<a@b.test> SIZE=1000 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=QQ+2Bx") else {
        panic!("not MAIL")
    };
    assert_eq!(mail.address, "a@b.test");
    assert_eq!(mail.size, Some(1000));
    assert_eq!(mail.body, BodyType::EightBitMime);
    assert!(mail.smtputf8);
    assert_eq!(mail.ret, Some(DsnRet::Hdrs));
    assert_eq!(mail.envid.as_deref(), Some("QQ+x"));
    assert!(!mail.requiretls);
    let Command::Mail(mail) = ok("MAIL FROM:<a@b.test> requiretls") else { panic!("not MAIL") };
    assert!(mail.requiretls);
    let Command::Mail(mail) = ok("MAIL FROM: <> body=7bit ret=full") else { panic!("not MAIL") };
    assert_eq!((mail.address.as_str(), mail.body, mail.ret), ("", BodyType::SevenBit, Some(DsnRet::Full)));
    // Source routes are ignored (RFC 5321 4.1.1.3); bare addresses are accepted leniently.
    let Command::Mail(mail) = ok("MAIL FROM:<@relay.test,@b.test:a@c.test>") else { panic!("not MAIL") };
    assert_eq!(mail.address, "a@c.test");
    let Command::Mail(mail) = ok("MAIL FROM:a@c.test SIZE=5") else { panic!("not MAIL") };
    assert_eq!((mail.address.as_str(), mail.size), ("a@c.test", Some(5)));
    // A quoted local part may contain '>' and spaces.
    let Command::Mail(mail) = ok(r#"MAIL FROM:<"odd > one"@c.test>"#) else { panic!("not MAIL") };
    assert_eq!(mail.address, r#""odd > one"@c.test"#);
}

#[test]
fn bad_mail_parameters() {
    assert!(matches!(err("MAIL FROM:<a@b.test> SIZE=lots"), CommandError::Syntax(_)));
    assert!(matches!(err("MAIL FROM:<a@b.test> SIZE=1 SIZE=2"), CommandError::Syntax(_)));
    assert!(matches!(err("MAIL FROM:<a@b.test> RET=ALL"), CommandError::Syntax(_)));
    assert!(matches!(err("MAIL FROM:<a@b.test> ENVID=a=b"), CommandError::Syntax(_)));
    assert!(matches!(err("MAIL FROM:<a@b.test> ENVID=+4"), CommandError::Syntax(_)));
    let long_envid = format!("MAIL FROM:<a@b.test> ENVID={}", "x".repeat(101));
    assert!(matches!(err(&long_envid), CommandError::Syntax(_)));
    assert_eq!(err("MAIL FROM:<a@b.test> BODY=BINARY").reply().code, 555);
    let Command::Mail(mail) = ok("MAIL FROM:<a@b.test> BODY=binarymime") else { panic!("MAIL") };
    assert_eq!(mail.body, BodyType::BinaryMime);
    assert_eq!(err("MAIL FROM:<a@b.test> AUTH=<>").reply().code, 555);
    assert_eq!(err("MAIL FROM:<a@b.test> SMTPUTF8=yes").reply().code, 555);
    // RFC 8689 2: REQUIRETLS takes no value.
    assert_eq!(err("MAIL FROM:<a@b.test> REQUIRETLS=yes").reply().code, 555);
    assert!(matches!(err("MAIL FROM:<a@b.test> REQUIRETLS REQUIRETLS"), CommandError::Syntax(_)));
    assert!(matches!(err("MAIL FROM:<a@b.test> =x"), CommandError::Syntax(_)));
}

#[test]
fn rcpt_parameters() {
    let Command::Rcpt(rcpt) = ok("RCPT TO:<c@d.test> NOTIFY=SUCCESS,failure,DELAY ORCPT=rfc822;c+2Bx@d.test") else {
        panic!("not RCPT")
    };
    assert_eq!(rcpt.notify, Some(vec![DsnNotify::Success, DsnNotify::Failure, DsnNotify::Delay]));
    assert_eq!(rcpt.orcpt.as_deref(), Some("rfc822;c+2Bx@d.test"));
    let Command::Rcpt(rcpt) = ok("RCPT TO:<c@d.test> NOTIFY=NEVER ORCPT=utf-8;j\u{f6}rg@d.test") else {
        panic!("not RCPT")
    };
    assert_eq!(rcpt.notify, Some(vec![DsnNotify::Never]));
    assert_eq!(rcpt.orcpt.as_deref(), Some("utf-8;j\u{f6}rg@d.test"));
    for bad in [
        "RCPT TO:<c@d.test> NOTIFY=NEVER,FAILURE",
        "RCPT TO:<c@d.test> NOTIFY=SOMETIMES",
        "RCPT TO:<c@d.test> NOTIFY=DELAY,DELAY",
        "RCPT TO:<c@d.test> ORCPT=c@d.test",
        "RCPT TO:<c@d.test> ORCPT=rfc822;c+zz",
        "RCPT TO:<c@d.test> ORCPT=;c",
    ] {
        assert!(matches!(err(bad), CommandError::Syntax(_)), "{bad}");
    }
    assert_eq!(err("RCPT TO:<c@d.test> SIZE=1").reply().code, 555);
}

#[test]
fn xtext() {
    assert_eq!(xtext_decode("abc").as_deref(), Some("abc"));
    assert_eq!(xtext_decode("a+2Bb+3Dc+20").as_deref(), Some("a+b=c "));
    assert_eq!(xtext_decode("a+2bb").as_deref(), Some("a+b"));
    assert_eq!(xtext_decode(""), Some(String::new()));
    for bad in ["a=b", "a b", "+", "+2", "+GG", "a+2", "\u{e9}"] {
        assert_eq!(xtext_decode(bad), None, "{bad}");
    }
    assert_eq!(xtext_encode("a+b=c d\u{e9}"), "a+2Bb+3Dc+20d+C3+A9");
    assert_eq!(xtext_decode(&xtext_encode("a+b=c d\u{e9}")).as_deref(), Some("a+b=c d\u{e9}"));
}

#[test]
fn length_limit() {
    // 512 octets with CRLF is the limit for ordinary commands (RFC 5321 4.5.3.1.4).
    let at_limit = format!("NOOP {}", "x".repeat(512 - 2 - 5));
    assert_eq!(ok(&at_limit), Command::Noop);
    assert_eq!(err(&format!("{at_limit}x")), CommandError::TooLong);
    assert_eq!(err(&format!("{at_limit}x")).reply().to_string(), "500 5.5.2 line too long\r\n");
    // RCPT may grow by 500 octets of DSN parameters (RFC 3461 5).
    let orcpt = format!("RCPT TO:<c@d.test> ORCPT=rfc822;{}", "x".repeat(450));
    assert!(matches!(ok(&orcpt), Command::Rcpt(_)));
    assert_eq!(err(&format!("RCPT TO:<c@d.test> ORCPT=rfc822;{}", "x".repeat(1000))), CommandError::TooLong);
}

#[test]
fn mailboxes() {
    assert_eq!(check_mailbox("a@b.test", false), Ok("b.test"));
    assert_eq!(check_mailbox("first.last+tag@Example.TEST", false), Ok("Example.TEST"));
    assert_eq!(check_mailbox(r#""a b"@c.test"#, false), Ok("c.test"));
    assert_eq!(check_mailbox("a@[192.0.2.1]", false), Ok("[192.0.2.1]"));
    assert_eq!(check_mailbox("a@b.test.", false), Ok("b.test."));
    assert_eq!(check_mailbox("j\u{f6}rg@d.test", true), Ok("d.test"));
    assert_eq!(check_mailbox("j\u{f6}rg@b\u{fc}cher.test", true), Ok("b\u{fc}cher.test"));
    assert!(check_mailbox("j\u{f6}rg@d.test", false).is_err());
    for bad in ["postmaster", "@b.test", "a@", "a..b@c.test", ".a@c.test", "a@b..test", "a@-b.test", "a b@c.test"] {
        assert!(check_mailbox(bad, true).is_err(), "{bad}");
    }
}

#[test]
fn bdat() {
    assert_eq!(ok("BDAT 1000"), Command::Bdat { size: 1000, last: false });
    assert_eq!(ok("bdat 0 last"), Command::Bdat { size: 0, last: true });
    assert_eq!(ok("BDAT  42  LAST "), Command::Bdat { size: 42, last: true });
    assert_eq!(ok("BDAT 18446744073709551615"), Command::Bdat { size: u64::MAX, last: false });
    // With a size, every other problem still says how many octets follow.
    for line in ["BDAT 5 FIRST", "BDAT 5 LAST x", "BDAT 5 LAST\x01"] {
        assert_eq!(
            err(line),
            CommandError::BadChunk { size: 5, text: "Syntax: BDAT chunk-size [LAST]".into() },
            "{line}"
        );
    }
    let long = format!("BDAT 7 LAST{}", " ".repeat(600));
    assert_eq!(ok(&long), Command::Bdat { size: 7, last: true }, "the line length does not hide the size");
    assert_eq!(err("BDAT 7 \u{e9}").reply().to_string(), "501 5.5.4 Syntax: BDAT chunk-size [LAST]\r\n");
    // Without one, nobody knows where the data ends.
    for line in ["BDAT", "BDAT LAST", "BDAT -1", "BDAT +5", "BDAT 0x10", "BDAT 18446744073709551616", "BDAT 1e3"] {
        assert_eq!(err(line), CommandError::NoChunkSize, "{line}");
    }
    assert_eq!(err("BDAT").reply().code, 421);
}
