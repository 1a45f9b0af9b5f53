//! Tier 4: TLS on a frontend's client endpoint, with real TLS clients.
//!
//! grpcurl (a third-party gRPC client, Go's TLS stack) and tonic's rustls client reach a
//! frontend serving a certificate from PEM files laid out as a `kubernetes.io/tls` Secret
//! is mounted; a client that trusts another CA, and a plaintext client, are refused. The
//! files replaced in place (cert-manager renewing, the kubelet refreshing the volume) are
//! picked up by the same process: clients trusting the new CA get in, clients trusting
//! only the old one no longer do. `/readyz` (what the probes use under TLS) says ready.

use std::path::Path;
use std::time::{Duration, Instant};

use switchyard_proto::inference::v1::{
    self as pb, generate_request::Input, inference_client::InferenceClient,
};
use switchyard_tests::FrontendProcess;
use switchyard_tests::pki::Pki;
use switchyard_tests::process::TempDir;
use switchyard_tests::tools::tool;
use switchyard_tests::worker::fixture_model;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// Runs grpcurl trusting `ca` against `addr`; its output, or its error output.
fn grpcurl(ca: &Path, addr: &str, call: &[&str]) -> Result<String, String> {
    let mut command = std::process::Command::new(tool("grpcurl").expect("grpcurl"));
    command
        .args(["-cacert"])
        .arg(ca)
        .args(["-max-time", "5"])
        .args(call.iter().take(call.len().saturating_sub(1)))
        .arg(addr);
    if let Some(last) = call.last() {
        command.arg(last);
    }
    let out = command.output().expect("running grpcurl");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

async fn tonic_client(ca: &Path, port: u16) -> Result<InferenceClient<Channel>, String> {
    let pem = std::fs::read(ca).map_err(|e| e.to_string())?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(InferenceClient::new(channel))
}

/// Puts `pki`'s serving pair where the frontend reads it, as the kubelet swaps a volume:
/// written aside, then moved into place.
fn install(pki: &Pki, dir: &Path) {
    for (from, to) in [
        (&pki.serving_cert, "tls.crt"),
        (&pki.serving_key, "tls.key"),
    ] {
        let staged = dir.join(format!(".{to}.new"));
        std::fs::copy(from, &staged).expect("staging");
        std::fs::rename(&staged, dir.join(to)).expect("moving into place");
    }
}

fn greedy() -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(Input::Prompt("hello there".into())),
        sampling: Some(pb::SamplingParams {
            max_tokens: Some(3),
            temperature: Some(0.0),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn tls_clients_get_in_a_wrong_ca_is_refused_and_a_rotated_certificate_is_picked_up() {
    let dir = TempDir::new("tls").expect("dir");
    let (first_dir, second_dir) = (dir.path().join("first"), dir.path().join("second"));
    std::fs::create_dir_all(&first_dir).expect("dir");
    std::fs::create_dir_all(&second_dir).expect("dir");
    let first = Pki::write(&first_dir).expect("first CA");
    let second = Pki::write(&second_dir).expect("second CA");
    let mounted = dir.path().join("mounted");
    std::fs::create_dir_all(&mounted).expect("mount dir");
    install(&first, &mounted);
    let cert = mounted.join("tls.crt");
    let key = mounted.join("tls.key");
    let frontend = FrontendProcess::start(
        &fixture_model("qwen3_moe"),
        &[
            "--tls-cert",
            cert.to_str().expect("utf-8"),
            "--tls-key",
            key.to_str().expect("utf-8"),
        ],
    )
    .await
    .expect("a TLS frontend");
    let port: u16 = frontend
        .endpoint()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the port");
    let addr = format!("127.0.0.1:{port}");
    let pid = frontend.process().pid();

    // A real TLS client, trusting the right CA: reflection and a Generate.
    let listed = grpcurl(&first.serving_ca, &addr, &["list"]).expect("grpcurl over TLS");
    assert!(listed.contains("switchyard.v1.Inference"), "{listed}");
    let answer = grpcurl(
        &first.serving_ca,
        &addr,
        &[
            "-d",
            r#"{"prompt": "hello there", "sampling": {"max_tokens": 3, "temperature": 0, "ignore_eos": true}}"#,
            "switchyard.v1.Inference/Generate",
        ],
    )
    .expect("grpcurl Generate over TLS");
    assert!(answer.contains("tokenIds"), "{answer}");
    let mut client = tonic_client(&first.serving_ca, port)
        .await
        .expect("tonic over TLS");
    let reply = client.generate(greedy()).await.expect("Generate over TLS");
    assert_eq!(reply.into_inner().token_ids.len(), 3);

    // The wrong CA and plaintext are refused.
    let refused =
        grpcurl(&second.serving_ca, &addr, &["list"]).expect_err("a client trusting another CA");
    assert!(refused.contains("certificate"), "{refused}");
    let mut plain = InferenceClient::connect(format!("http://{addr}"))
        .await
        .expect("TCP connects");
    assert!(
        plain.generate(greedy()).await.is_err(),
        "plaintext is refused"
    );

    // /readyz, what the kubelet probes when the gRPC port speaks TLS.
    let readyz = frontend.http("/readyz").await.expect("/readyz");
    assert!(
        readyz.starts_with("HTTP/1.1 200") || readyz.starts_with("HTTP/1.0 200"),
        "{readyz}"
    );

    // Rotation: the second CA's pair moved into place; the same process serves it.
    install(&second, &mounted);
    let started = Instant::now();
    loop {
        let new = grpcurl(&second.serving_ca, &addr, &["list"]);
        let old = grpcurl(&first.serving_ca, &addr, &["list"]);
        if new.is_ok() && old.is_err() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the rotated certificate was not picked up: new CA {new:?}, old CA {old:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "TLS rotation picked up {:?} after the files changed",
        started.elapsed()
    );
    let mut client = tonic_client(&second.serving_ca, port)
        .await
        .expect("tonic trusting the new CA");
    client
        .generate(greedy())
        .await
        .expect("Generate after rotation");
    assert_eq!(frontend.process().pid(), pid);
    frontend.process().check_running().expect("no restart");

    // A broken pair is refused; the current certificate stays in use.
    std::fs::write(mounted.join(".tls.key.new"), "not a key").expect("write");
    std::fs::rename(mounted.join(".tls.key.new"), &key).expect("rename");
    tokio::time::sleep(Duration::from_secs(6)).await;
    grpcurl(&second.serving_ca, &addr, &["list"]).expect("still serving the last good pair");
    let log = frontend.process().log_tail(100);
    assert!(
        log.contains("cannot be used; keeping the previous certificate"),
        "{log}"
    );
}

#[tokio::test]
async fn a_certificate_without_its_key_or_a_bad_pair_stops_the_start_naming_the_file() {
    let dir = TempDir::new("tls-bad").expect("dir");
    let pki = Pki::write(dir.path()).expect("pki");
    let worker = switchyard_tests::tools::workspace_binary("switchyard-worker").expect("worker");
    let run = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(&worker)
            .args([
                "--role",
                "frontend",
                "--model",
                "demo",
                "--listen",
                "127.0.0.1:0",
            ])
            .args(args)
            .output()
            .expect("running the worker");
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let only_cert = run(&["--tls-cert".as_ref(), pki.serving_cert.as_os_str()]);
    assert!(only_cert.contains("--tls-key"), "{only_cert}");
    let mismatched = run(&[
        "--tls-cert".as_ref(),
        pki.serving_cert.as_os_str(),
        "--tls-key".as_ref(),
        pki.admin_key.as_os_str(),
    ]);
    assert!(
        mismatched.contains("does not fit the certificate"),
        "{mismatched}"
    );
}
