//! Generates AION's gRPC API (`proto/status.proto`) with the `grpc` feature: protox compiles the file (no protoc),
//! tonic-prost-build writes the messages, the server and the client.

fn main() {
    #[cfg(feature = "grpc")]
    grpc();
}

#[cfg(feature = "grpc")]
fn grpc() {
    println!("cargo:rerun-if-changed=proto/status.proto");
    let fds = match protox::compile(["proto/status.proto"], ["proto"]) {
        Ok(f) => f,
        Err(e) => {
            println!("cargo:warning=proto/status.proto: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds) {
        println!("cargo:warning=generating the gRPC code failed: {e}");
        std::process::exit(1);
    }
}
