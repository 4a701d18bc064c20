use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use super::*;
use crate::testing::corpus;

const SHAKESPEARE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/corpora/tinyshakespeare.txt");

fn source(url: &str) -> Source {
    Source { url: url.to_string(), ..Source::default() }
}

fn params(sources: Vec<Source>) -> Params {
    Params { sources, retries: 2, timeout_secs: 5, backoff_ms: 20, ..Params::default() }
}

/// Runs the stage in a fresh project directory; returns it, the output
/// directory, and the result.
fn run(p: &Params, project: &Path) -> (tempfile::TempDir, Result<()>) {
    let out = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let mut ctx = StageCtx::new("corpus", project, out.path(), work.path());
    let result = Download::run(p, &mut ctx);
    (out, result)
}

fn texts(out: &Path) -> Vec<String> {
    docs::texts(&docs::read(out).unwrap()).unwrap()
}

fn column(out: &Path, name: &str) -> Vec<String> {
    let df = docs::read(out).unwrap();
    df.column(name).unwrap().str().unwrap().iter().map(|s| s.unwrap().to_string()).collect()
}

#[test]
fn splits_text_by_file_paragraph_and_lines() {
    let project = tempfile::tempdir().unwrap();
    fs::write(project.path().join("a.txt"), "one\ntwo\n\n\nthree\n  \nfour\nfive\n").unwrap();
    let with = |split| Params { sources: vec![Source { split, ..source("a.txt") }], ..Params::default() };
    let (out, r) = run(&with(SplitBy::File), project.path());
    r.unwrap();
    assert_eq!(texts(out.path()), ["one\ntwo\n\n\nthree\n  \nfour\nfive\n"]);
    let (out, r) = run(&with(SplitBy::Paragraph), project.path());
    r.unwrap();
    assert_eq!(texts(out.path()), ["one\ntwo", "three", "four\nfive"]);
    assert_eq!(column(out.path(), "id"), ["a.txt#0", "a.txt#1", "a.txt#2"]);
    let (out, r) = run(&with(SplitBy::Lines(3)), project.path());
    r.unwrap();
    assert_eq!(texts(out.path()), ["one\ntwo\n", "\nthree\n  ", "four\nfive"]);
}

#[test]
fn params_parse_and_check() {
    let value = serde_json::json!({ "sources": [{ "url": "a.jsonl", "split": { "lines": 3 } }] });
    let p: Params = serde_json::from_value(value).unwrap();
    assert_eq!(p.sources[0].split, SplitBy::Lines(3));
    assert_eq!(p.sources[0].text_field, "text");
    let err = Download::check(&p, &[]).unwrap_err();
    assert_eq!(
        (err.path, err.message.as_str()),
        (vec!["sources".to_string(), "0".into(), "split".into()], "`split` applies to text sources only")
    );
    let unknown = serde_json::json!({ "sources": [{ "url": "a.txt", "checksum": "x" }] });
    assert!(serde_json::from_value::<Params>(unknown).unwrap_err().to_string().contains("unknown field `checksum`"));
    assert!(Download::check(&Params::default(), &[]).unwrap_err().message.contains("`sources` is empty"));
}

#[test]
fn reads_shipped_corpus_with_checksums() {
    let bytes = fs::read(SHAKESPEARE).unwrap();
    let sha: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    let src = Source {
        url: format!("file://{SHAKESPEARE}"),
        blake3: Some(blake3::hash(&bytes).to_hex().to_string()),
        sha256: Some(sha),
        split: SplitBy::Paragraph,
        ..Source::default()
    };
    let (out, r) = run(&params(vec![src]), Path::new("/"));
    r.unwrap();
    let paragraphs = corpus("tinyshakespeare.txt").split("\n\n").filter(|p| !p.trim().is_empty()).count();
    assert_eq!(texts(out.path()).len(), paragraphs);
}

#[test]
fn wrong_checksum_names_source_and_both_digests() {
    let wrong = "0".repeat(64);
    let src = Source { url: SHAKESPEARE.to_string(), blake3: Some(wrong.clone()), ..Source::default() };
    let (out, r) = run(&params(vec![src]), Path::new("/"));
    let message = format!("{:#}", r.unwrap_err());
    let actual = blake3::hash(&fs::read(SHAKESPEARE).unwrap()).to_hex().to_string();
    assert!(message.contains(SHAKESPEARE) && message.contains(&wrong) && message.contains(&actual), "{message}");
    assert!(!out.path().join(docs::DIR).exists());
}

#[test]
fn formats_compression_and_globs() {
    let project = tempfile::tempdir().unwrap();
    let dir = project.path().join("raw");
    fs::create_dir(&dir).unwrap();
    let jsonl = "{\"content\": \"first record\"}\n\n{\"content\": \"second record\", \"n\": 2}\n";
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(jsonl.as_bytes()).unwrap();
    fs::write(dir.join("b.jsonl.gz"), gz.finish().unwrap()).unwrap();
    fs::write(dir.join("a.jsonl.zst"), zstd::encode_all(jsonl.as_bytes(), 3).unwrap()).unwrap();
    let mut df = docs::frame(vec!["x".into(), "y".into()], vec!["pq one".into(), "pq two".into()], vec!["s".into(); 2]).unwrap();
    docs::write_table(&dir.join("c.parquet"), &mut df).unwrap();

    let jsonl_source = Source { text_field: "content".into(), ..source("raw/*.jsonl.*") };
    let (out, r) = run(&params(vec![jsonl_source, source("raw/c.parquet")]), project.path());
    r.unwrap();
    assert_eq!(texts(out.path()), ["first record", "second record", "first record", "second record", "pq one", "pq two"]);
    assert_eq!(column(out.path(), "source")[..3], ["raw/a.jsonl.zst", "raw/a.jsonl.zst", "raw/b.jsonl.gz"]);
    assert_eq!(Download::files(&params(vec![source("raw/*.jsonl.*")])), ["raw"]);

    let missing = Source { text_field: "body".into(), ..source("raw/a.jsonl.zst") };
    let (_, r) = run(&params(vec![missing]), project.path());
    let message = format!("{:#}", r.unwrap_err());
    assert!(message.contains("raw/a.jsonl.zst") && message.contains("no string field `body`"), "{message}");
}

/// `id_field` keeps the corpus's own ids (strings or numbers, from JSONL or
/// Parquet); a record without one is an error naming its line.
#[test]
fn source_ids_are_kept() {
    let project = tempfile::tempdir().unwrap();
    let dir = project.path().join("raw");
    fs::create_dir(&dir).unwrap();
    let records = "{\"id\": \"<urn:uuid:1>\", \"text\": \"one\"}\n{\"id\": 7, \"text\": \"two\"}\n";
    fs::write(dir.join("a.jsonl"), records).unwrap();
    fs::write(dir.join("e.jsonl"), records).unwrap();
    let mut df = docs::frame(vec!["p-1".into(), "p-2".into()], vec!["pq one".into(), "pq two".into()], vec!["s".into(); 2]).unwrap();
    docs::write_table(&dir.join("b.parquet"), &mut df).unwrap();
    let with_ids = |url: &str| Source { id_field: Some("id".into()), ..source(url) };
    let (out, r) = run(&params(vec![with_ids("raw/a.jsonl"), with_ids("raw/b.parquet"), source("raw/e.jsonl")]), project.path());
    r.unwrap();
    assert_eq!(column(out.path(), "id"), ["<urn:uuid:1>", "7", "p-1", "p-2", "raw/e.jsonl#0", "raw/e.jsonl#1"]);
    assert_eq!(texts(out.path())[..2], ["one", "two"]);

    fs::write(dir.join("c.jsonl"), "{\"id\": \"x\", \"text\": \"one\"}\n{\"text\": \"two\"}\n").unwrap();
    let (_, r) = run(&params(vec![with_ids("raw/c.jsonl")]), project.path());
    let message = format!("{:#}", r.unwrap_err());
    assert!(message.contains("raw/c.jsonl") && message.contains("line 2: no string or number field `id`"), "{message}");
    fs::write(dir.join("d.txt"), "text").unwrap();
    let (_, r) = run(&params(vec![with_ids("raw/d.txt")]), project.path());
    assert!(format!("{:#}", r.unwrap_err()).contains("`id_field` needs JSONL or Parquet"));
}

#[test]
fn a_decompression_bomb_stops_at_max_bytes() {
    let project = tempfile::tempdir().unwrap();
    // 64 MiB of zeros: about 64 KB of gzip.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&vec![b'a'; 64 << 20]).unwrap();
    let bomb = gz.finish().unwrap();
    assert!(bomb.len() < 100_000, "{}", bomb.len());
    fs::write(project.path().join("bomb.txt.gz"), &bomb).unwrap();
    let p = Params { max_bytes: 1 << 20, ..params(vec![source("bomb.txt.gz")]) };
    let (_, r) = run(&p, project.path());
    let message = format!("{:#}", r.unwrap_err());
    assert!(message.contains("bomb.txt.gz") && message.contains("more than `max_bytes` (1048576 bytes)"), "{message}");
}

/// A scripted HTTP/1.1 server on 127.0.0.1: `respond(n, request)` gets the
/// request number and its text, and writes the raw response.
struct Server {
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(respond: impl Fn(usize, &str, &mut TcpStream) + Send + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                let mut stream = stream.unwrap();
                let mut request = String::new();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                while reader.read_line(&mut request).unwrap() > 2 {}
                seen.lock().unwrap().push(request.clone());
                respond(n, &request, &mut stream);
            }
        });
        Server { url, requests }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn reply(stream: &mut TcpStream, status: &str, headers: &str, body: &[u8]) {
    let head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n", body.len());
    let _ = stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(body));
}

#[test]
fn http_download_equals_local_copy_through_mirrors() {
    let bytes = fs::read(SHAKESPEARE).unwrap();
    let body = bytes.clone();
    let server = Server::start(move |_, _, s| reply(s, "200 OK", "", &body));
    let checksum = Some(blake3::hash(&bytes).to_hex().to_string());
    // The primary url is down (nothing listens on it); one run gets the bytes
    // from the server, the other from the local copy.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let primary = format!("http://{dead}/tinyshakespeare.txt");
    let via = |mirror: String| Source {
        url: primary.clone(),
        mirrors: vec![mirror],
        blake3: checksum.clone(),
        split: SplitBy::Paragraph,
        ..Source::default()
    };
    let (remote, r) = run(&params(vec![via(format!("{}/input.txt", server.url))]), Path::new("/"));
    r.unwrap();
    let (local, r) = run(&params(vec![via(SHAKESPEARE.to_string())]), Path::new("/"));
    r.unwrap();
    let part = |dir: &Path| fs::read(dir.join(docs::DIR).join(docs::part_name(0))).unwrap();
    assert_eq!(part(remote.path()), part(local.path()));
    assert_eq!(column(remote.path(), "source")[0], primary);
}

#[test]
fn http_retries_after_server_error() {
    let server = Server::start(|n, _, s| match n {
        0 => reply(s, "503 Service Unavailable", "", b"busy"),
        _ => reply(s, "200 OK", "", b"hello from the server"),
    });
    let (out, r) = run(&params(vec![source(&format!("{}/a.txt", server.url))]), Path::new("/"));
    r.unwrap();
    assert_eq!(texts(out.path()), ["hello from the server"]);
    assert_eq!(server.requests().len(), 2);

    let gone = Server::start(|_, _, s| reply(s, "404 Not Found", "", b""));
    let (_, r) = run(&params(vec![source(&format!("{}/a.txt", gone.url))]), Path::new("/"));
    let message = format!("{:#}", r.unwrap_err());
    assert!(message.contains("HTTP 404") && message.contains(&gone.url), "{message}");
    assert_eq!(gone.requests().len(), 1, "a 404 is not retried");
}

#[test]
fn http_resumes_a_cut_body_with_range() {
    let bytes = fs::read(SHAKESPEARE).unwrap();
    let body = bytes.clone();
    let half = body.len() / 2;
    let server = Server::start(move |n, request, s| {
        if n == 0 {
            // Promise the whole body, send half, hang up.
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = s.write_all(head.as_bytes()).and_then(|_| s.write_all(&body[..half]));
            return;
        }
        let start: usize = request
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("range: bytes=").map(|r| r.trim_end_matches('-').to_string()))
            .map_or(0, |r| r.parse().unwrap());
        let range = format!("Content-Range: bytes {start}-{}/{}\r\n", body.len() - 1, body.len());
        reply(s, "206 Partial Content", &range, &body[start..]);
    });
    let src = Source { blake3: Some(blake3::hash(&bytes).to_hex().to_string()), ..source(&format!("{}/input.txt", server.url)) };
    let (out, r) = run(&params(vec![src]), Path::new("/"));
    r.unwrap();
    assert_eq!(texts(out.path()), [String::from_utf8(bytes).unwrap()]);
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    assert!(requests[1].to_ascii_lowercase().contains(&format!("range: bytes={half}-")), "{}", requests[1]);
}
