//! The tiniest primary MX for the browser test: answers 250 to everything on a given loopback
//! address and counts the messages it receives. Stops (and closes its socket) on drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

pub struct AcceptAll {
    pub messages: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AcceptAll {
    pub fn start(addr: SocketAddr) -> AcceptAll {
        let listener = TcpListener::bind(addr).expect("bind the test primary");
        listener.set_nonblocking(true).expect("nonblocking");
        let messages = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopping) = (Arc::clone(&messages), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let count = Arc::clone(&count);
                        std::thread::spawn(move || {
                            let _ = serve(stream, &count);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        AcceptAll { messages, stop, thread: Some(thread) }
    }
}

impl Drop for AcceptAll {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(stream: TcpStream, count: &AtomicUsize) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    writer.write_all(b"220 primary.example.test ESMTP test\r\n")?;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let verb = line.get(..4).unwrap_or_default().to_ascii_uppercase();
        match verb.as_str() {
            "EHLO" => writer.write_all(b"250-primary.example.test\r\n250 8BITMIME\r\n")?,
            "DATA" => {
                writer.write_all(b"354 go ahead\r\n")?;
                loop {
                    line.clear();
                    if reader.read_line(&mut line)? == 0 || line == ".\r\n" {
                        break;
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
                writer.write_all(b"250 2.0.0 Ok: queued\r\n")?;
            }
            "QUIT" => {
                writer.write_all(b"221 2.0.0 Bye\r\n")?;
                return Ok(());
            }
            _ => writer.write_all(b"250 2.0.0 Ok\r\n")?,
        }
    }
}
