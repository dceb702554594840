;; The demo's microservice: a wasi:http/proxy component written by hand in the component text
;; format, so `caisson demo` needs no Rust/Wasm toolchain and no network (the engine compiles
;; the text like any .wat). Every request gets `200` and one line of text.
;;
;; The imports are the subset of wasi:http/types and wasi:io@0.2.0 it calls, with their exact
;; types (the host checks them). A core module $Mem owns the memory and a bump allocator
;; (`realloc`, for what the host writes back); $Main does the work through lowered imports.
(component $C
  (import "wasi:io/error@0.2.0" (instance $io-error
    (export "error" (type (sub resource)))
  ))
  (alias export $io-error "error" (type $error))

  (import "wasi:io/streams@0.2.0" (instance $streams
    (alias outer $C $error (type $error'))
    (export "error" (type $e (eq $error')))
    (type $stream-error' (variant (case "last-operation-failed" (own $e)) (case "closed")))
    (export "stream-error" (type $stream-error (eq $stream-error')))
    (export "output-stream" (type $output-stream (sub resource)))
    (export "[method]output-stream.blocking-write-and-flush"
      (func (param "self" (borrow $output-stream)) (param "contents" (list u8))
            (result (result (error $stream-error)))))
  ))
  (alias export $streams "output-stream" (type $output-stream))

  (import "wasi:http/types@0.2.0" (instance $types
    (alias outer $C $output-stream (type $output-stream'))
    (export "output-stream" (type $os (eq $output-stream')))
    (export "fields" (type $fields (sub resource)))
    (export "trailers" (type $trailers (eq $fields)))
    (export "incoming-request" (type $incoming-request (sub resource)))
    (export "outgoing-response" (type $outgoing-response (sub resource)))
    (export "outgoing-body" (type $outgoing-body (sub resource)))
    (export "response-outparam" (type $response-outparam (sub resource)))
    (type $dns' (record (field "rcode" (option string)) (field "info-code" (option u16))))
    (export "DNS-error-payload" (type $dns (eq $dns')))
    (type $tls' (record (field "alert-id" (option u8)) (field "alert-message" (option string))))
    (export "TLS-alert-received-payload" (type $tls (eq $tls')))
    (type $fsp' (record (field "field-name" (option string)) (field "field-size" (option u32))))
    (export "field-size-payload" (type $fsp (eq $fsp')))
    (type $error-code' (variant
      (case "DNS-timeout")
      (case "DNS-error" $dns)
      (case "destination-not-found")
      (case "destination-unavailable")
      (case "destination-IP-prohibited")
      (case "destination-IP-unroutable")
      (case "connection-refused")
      (case "connection-terminated")
      (case "connection-timeout")
      (case "connection-read-timeout")
      (case "connection-write-timeout")
      (case "connection-limit-reached")
      (case "TLS-protocol-error")
      (case "TLS-certificate-error")
      (case "TLS-alert-received" $tls)
      (case "HTTP-request-denied")
      (case "HTTP-request-length-required")
      (case "HTTP-request-body-size" (option u64))
      (case "HTTP-request-method-invalid")
      (case "HTTP-request-URI-invalid")
      (case "HTTP-request-URI-too-long")
      (case "HTTP-request-header-section-size" (option u32))
      (case "HTTP-request-header-size" (option $fsp))
      (case "HTTP-request-trailer-section-size" (option u32))
      (case "HTTP-request-trailer-size" $fsp)
      (case "HTTP-response-incomplete")
      (case "HTTP-response-header-section-size" (option u32))
      (case "HTTP-response-header-size" $fsp)
      (case "HTTP-response-body-size" (option u64))
      (case "HTTP-response-trailer-section-size" (option u32))
      (case "HTTP-response-trailer-size" $fsp)
      (case "HTTP-response-transfer-coding" (option string))
      (case "HTTP-response-content-coding" (option string))
      (case "HTTP-response-timeout")
      (case "HTTP-upgrade-failed")
      (case "HTTP-protocol-error")
      (case "loop-detected")
      (case "configuration-error")
      (case "internal-error" (option string))))
    (export "error-code" (type $error-code (eq $error-code')))
    (export "[constructor]fields" (func (result (own $fields))))
    (export "[constructor]outgoing-response"
      (func (param "headers" (own $fields)) (result (own $outgoing-response))))
    (export "[method]outgoing-response.body"
      (func (param "self" (borrow $outgoing-response)) (result (result (own $outgoing-body)))))
    (export "[method]outgoing-body.write"
      (func (param "self" (borrow $outgoing-body)) (result (result (own $os)))))
    (export "[static]outgoing-body.finish"
      (func (param "this" (own $outgoing-body)) (param "trailers" (option (own $trailers)))
            (result (result (error $error-code)))))
    (export "[static]response-outparam.set"
      (func (param "param" (own $response-outparam))
            (param "response" (result (own $outgoing-response) (error $error-code)))))
  ))
  (alias export $types "incoming-request" (type $incoming-request))
  (alias export $types "response-outparam" (type $response-outparam))

  (core module $Mem
    (memory (export "memory") 1)
    (global $heap (mut i32) (i32.const 4096))
    ;; A bump allocator: the host asks for room for what it returns (error strings).
    (func (export "realloc") (param i32 i32) (param $align i32) (param $size i32) (result i32)
      (local $p i32)
      (local.set $p
        (i32.and
          (i32.add (global.get $heap) (i32.sub (local.get $align) (i32.const 1)))
          (i32.sub (i32.const 0) (local.get $align))))
      (global.set $heap (i32.add (local.get $p) (local.get $size)))
      (if (i32.gt_u (global.get $heap) (i32.shl (memory.size) (i32.const 16)))
        (then
          (if (i32.lt_s
                (memory.grow (i32.add (i32.shr_u (i32.sub (global.get $heap)
                                                          (i32.shl (memory.size) (i32.const 16)))
                                                  (i32.const 16))
                                      (i32.const 1)))
                (i32.const 0))
            (then unreachable))))
      (local.get $p))
  )
  (core instance $mem (instantiate $Mem))
  (alias core export $mem "memory" (core memory $memory))
  (alias core export $mem "realloc" (core func $realloc))

  (core func $fields-new (canon lower (func $types "[constructor]fields")))
  (core func $response-new (canon lower (func $types "[constructor]outgoing-response")))
  (core func $response-body
    (canon lower (func $types "[method]outgoing-response.body") (memory $memory)))
  (core func $body-write
    (canon lower (func $types "[method]outgoing-body.write") (memory $memory)))
  (core func $body-finish
    (canon lower (func $types "[static]outgoing-body.finish") (memory $memory) (realloc $realloc)))
  (core func $outparam-set
    (canon lower (func $types "[static]response-outparam.set") (memory $memory) (realloc $realloc)))
  (core func $write-flush
    (canon lower (func $streams "[method]output-stream.blocking-write-and-flush")
      (memory $memory) (realloc $realloc)))
  (core func $drop-stream (canon resource.drop $output-stream))
  (core func $drop-request (canon resource.drop $incoming-request))

  (core module $Main
    (import "mem" "memory" (memory 1))
    (import "t" "fields-new" (func $fields-new (result i32)))
    (import "t" "response-new" (func $response-new (param i32) (result i32)))
    (import "t" "response-body" (func $response-body (param i32 i32)))
    (import "t" "body-write" (func $body-write (param i32 i32)))
    (import "t" "body-finish" (func $body-finish (param i32 i32 i32 i32)))
    (import "t" "outparam-set"
      (func $outparam-set (param i32 i32 i32 i32 i64 i32 i32 i32 i32)))
    (import "t" "write-flush" (func $write-flush (param i32 i32 i32 i32)))
    (import "t" "drop-stream" (func $drop-stream (param i32)))
    (import "t" "drop-request" (func $drop-request (param i32)))
    (data (i32.const 256) "hello from a Wasm microservice (wasi:http component, run by caisson)\n")
    ;; Results come back at 16 (discriminant byte, then the payload at 20).
    (func $ok-handle (result i32)
      (if (i32.load8_u (i32.const 16)) (then unreachable))
      (i32.load (i32.const 20)))
    (func (export "handle") (param $request i32) (param $out i32)
      (local $response i32) (local $body i32) (local $stream i32)
      (call $drop-request (local.get $request))
      (local.set $response (call $response-new (call $fields-new)))
      (call $response-body (local.get $response) (i32.const 16))
      (local.set $body (call $ok-handle))
      (call $outparam-set (local.get $out) (i32.const 0) (local.get $response)
        (i32.const 0) (i64.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))
      (call $body-write (local.get $body) (i32.const 16))
      (local.set $stream (call $ok-handle))
      (call $write-flush (local.get $stream) (i32.const 256) (i32.const 69) (i32.const 16))
      (if (i32.load8_u (i32.const 16)) (then unreachable))
      (call $drop-stream (local.get $stream))
      (call $body-finish (local.get $body) (i32.const 0) (i32.const 0) (i32.const 16))
      (if (i32.load8_u (i32.const 16)) (then unreachable)))
  )
  (core instance $main (instantiate $Main
    (with "mem" (instance $mem))
    (with "t" (instance
      (export "fields-new" (func $fields-new))
      (export "response-new" (func $response-new))
      (export "response-body" (func $response-body))
      (export "body-write" (func $body-write))
      (export "body-finish" (func $body-finish))
      (export "outparam-set" (func $outparam-set))
      (export "write-flush" (func $write-flush))
      (export "drop-stream" (func $drop-stream))
      (export "drop-request" (func $drop-request))))))

  (func $handle
    (param "request" (own $incoming-request)) (param "response-out" (own $response-outparam))
    (canon lift (core func $main "handle")))
  (instance $handler (export "handle" (func $handle)))
  (export "wasi:http/incoming-handler@0.2.0" (instance $handler))
)
