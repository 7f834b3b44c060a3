//! A tiny authoritative DNS server for tests: hickory-server in process on 127.0.0.1:0 (UDP and
//! TCP), answering from a table of MX, A and AAAA records. Unknown names get NXDOMAIN; known names
//! without the asked type get an empty NOERROR answer; names marked `servfail` get SERVFAIL.
//! Dropping the `DnsServer` stops it.

#![allow(dead_code)]

use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, MX};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::time::Duration;
use tokio::net::{TcpListener, UdpSocket};

/// The records to serve.
#[derive(Default, Clone)]
pub struct Zone {
    records: HashMap<(String, RecordType), Vec<Record>>,
    names: HashSet<String>,
    servfail: HashSet<String>,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn fqdn(name: &str) -> Name {
    Name::from_ascii(format!("{}.", name.trim_end_matches('.'))).expect("test names are valid")
}

impl Zone {
    pub fn new() -> Zone {
        Zone::default()
    }

    fn add(mut self, name: &str, rtype: RecordType, data: RData) -> Zone {
        self.names.insert(key(name));
        let record = Record::from_rdata(fqdn(name), 60, data);
        self.records.entry((key(name), rtype)).or_default().push(record);
        self
    }

    pub fn mx(self, domain: &str, preference: u16, host: &str) -> Zone {
        let exchange = if host == "." { Name::root() } else { fqdn(host) };
        self.add(domain, RecordType::MX, RData::MX(MX::new(preference, exchange)))
    }

    /// RFC 7505 null MX: `0 .`.
    pub fn null_mx(self, domain: &str) -> Zone {
        self.mx(domain, 0, ".")
    }

    pub fn addr(self, name: &str, ip: &str) -> Zone {
        match ip.parse::<IpAddr>().expect("test addresses are valid") {
            IpAddr::V4(v4) => self.add(name, RecordType::A, RData::A(A(v4))),
            IpAddr::V6(v6) => self.add(name, RecordType::AAAA, RData::AAAA(AAAA(v6))),
        }
    }

    /// A TXT record (one string), e.g. an SPF policy.
    pub fn txt(self, name: &str, text: &str) -> Zone {
        self.add(name, RecordType::TXT, RData::TXT(hickory_server::proto::rr::rdata::TXT::new(vec![text.to_string()])))
    }

    /// A TLSA record (RFC 6698): `usage selector matching data`.
    pub fn tlsa(self, name: &str, usage: u8, selector: u8, matching: u8, data: &[u8]) -> Zone {
        use hickory_server::proto::rr::rdata::TLSA;
        let tlsa = TLSA::new(usage.into(), selector.into(), matching.into(), data.to_vec());
        self.add(name, RecordType::TLSA, RData::TLSA(tlsa))
    }

    pub fn servfail(mut self, name: &str) -> Zone {
        self.servfail.insert(key(name));
        self
    }
}

struct Handler {
    zone: Zone,
}

// The trait is declared with `#[async_trait]`; this is the signature that macro expands to, written
// out so the tests need no async-trait dependency.
impl RequestHandler for Handler {
    fn handle_request<'life0, 'life1, 'async_trait, R, T>(
        &'life0 self,
        request: &'life1 Request,
        response: R,
    ) -> Pin<Box<dyn Future<Output = ResponseInfo> + Send + 'async_trait>>
    where
        R: ResponseHandler + 'async_trait,
        T: Time + 'async_trait,
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(self.answer(request, response))
    }
}

impl Handler {
    async fn answer<R: ResponseHandler>(&self, request: &Request, mut response: R) -> ResponseInfo {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        let builder = MessageResponseBuilder::from_message_request(request);
        let Ok(info) = request.request_info() else {
            return failed(metadata);
        };
        let name = key(&info.query.name().to_string());
        let rtype = info.query.query_type();
        if self.zone.servfail.contains(&name) {
            let message = builder.error_msg(&request.metadata, ResponseCode::ServFail);
            return response.send_response(message).await.unwrap_or_else(|_| failed(metadata));
        }
        if !self.zone.names.contains(&name) {
            let message = builder.error_msg(&request.metadata, ResponseCode::NXDomain);
            return response.send_response(message).await.unwrap_or_else(|_| failed(metadata));
        }
        let answers = self.zone.records.get(&(name, rtype)).map(Vec::as_slice).unwrap_or(&[]);
        let message = builder.build(metadata, answers.iter(), None.iter(), None.iter(), None.iter());
        response.send_response(message).await.unwrap_or_else(|_| failed(metadata))
    }
}

fn failed(mut metadata: Metadata) -> ResponseInfo {
    metadata.response_code = ResponseCode::ServFail;
    ResponseInfo::from(Header { metadata, counts: HeaderCounts::default() })
}

/// A running DNS server; `addr` is where UDP and TCP both listen.
pub struct DnsServer {
    pub addr: SocketAddr,
    _server: Server<Handler>,
}

impl DnsServer {
    pub async fn start(zone: Zone) -> DnsServer {
        // The UDP port may already be taken for TCP by another test: try a few ports.
        let mut sockets = None;
        for _ in 0..50 {
            let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind DNS UDP");
            let addr = udp.local_addr().expect("local addr");
            if let Ok(tcp) = TcpListener::bind(addr).await {
                sockets = Some((udp, addr, tcp));
                break;
            }
        }
        let (udp, addr, tcp) = sockets.expect("a port free for both UDP and TCP on 127.0.0.1");
        let mut server = Server::new(Handler { zone });
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 64);
        DnsServer { addr, _server: server }
    }
}

/// A name server that never answers: UDP bound but never read, TCP accepted by the kernel only.
pub struct SilentDns {
    pub addr: SocketAddr,
    _udp: std::net::UdpSocket,
    _tcp: std::net::TcpListener,
}

impl SilentDns {
    pub fn start() -> SilentDns {
        // The UDP port may already be taken for TCP by another test: try a few ports.
        for _ in 0..50 {
            let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind silent UDP");
            let addr = udp.local_addr().expect("local addr");
            if let Ok(tcp) = std::net::TcpListener::bind(addr) {
                return SilentDns { addr, _udp: udp, _tcp: tcp };
            }
        }
        panic!("no port free for both UDP and TCP on 127.0.0.1");
    }
}
