//! Answers every request with `hello from wasi:http <METHOD> <PATH>`; `/env/NAME` answers the
//! variable's value, `/trap` traps, `/loop` never returns (computing), `/sleep/MS` answers after
//! MS milliseconds (blocked in a host call), `/alloc/MIB` touches MIB MiB of fresh memory first.
use wasi::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Service;

wasi::http::proxy::export!(Service);

impl wasi::exports::http::incoming_handler::Guest for Service {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let method = match request.method() {
            Method::Get => "GET".to_string(),
            Method::Post => "POST".to_string(),
            other => format!("{other:?}"),
        };
        if path == "/trap" {
            panic!("trap requested");
        }
        if path == "/loop" {
            let mut x: u64 = 0;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        if let Some(ms) = path.strip_prefix("/sleep/") {
            let ms: u64 = ms.parse().unwrap_or(0);
            wasi::clocks::monotonic_clock::subscribe_duration(ms * 1_000_000).block();
        }
        let mut kept = Vec::new();
        if let Some(mib) = path.strip_prefix("/alloc/") {
            for i in 0..mib.parse::<usize>().unwrap_or(0) {
                kept.push(std::hint::black_box(vec![i as u8; 1 << 20]));
            }
        }
        let body_text = match path.strip_prefix("/env/") {
            Some(name) => std::env::var(name).unwrap_or_default(),
            None => format!("hello from wasi:http {method} {path}\n"),
        };
        let headers = Fields::new();
        let _ = headers.set("content-type", &[b"text/plain".to_vec()]);
        let resp = OutgoingResponse::new(headers);
        let body = resp.body().expect("body");
        ResponseOutparam::set(out, Ok(resp));
        let stream = body.write().expect("stream");
        stream
            .blocking_write_and_flush(body_text.as_bytes())
            .expect("write");
        drop(stream);
        OutgoingBody::finish(body, None).expect("finish");
    }
}
