//! Answers every request with `hello from wasi:http <METHOD> <PATH>`; `/env/NAME` answers the
//! variable's value, `/trap` traps.
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
