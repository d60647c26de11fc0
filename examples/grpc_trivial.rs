//! A gRPC server that only answers (`kanbanpb.Kanban/SendKanban` → SUCCESS): the ceiling a Python AION client
//! reaches, for `benches/grpc_py.py` (the ratio of what it pushes through aion to what it pushes here).
//!
//! Usage: `grpc-trivial 127.0.0.1:PORT`.
use aion_transport::grpc::kanbanpb::kanban_server::{Kanban, KanbanServer};
use aion_transport::grpc::kanbanpb::{
    DeleteStaticRequest, InitializeService, Request as SendRequest, Response as SendResponse, StaticKanban,
    StaticRequest, StatusKanban, Topic,
};
use tonic::{Request, Response, Status};

struct Trivial;

type Stream<T> = std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Kanban for Trivial {
    type ReceiveKanbanStream = Stream<StatusKanban>;
    type ReceiveStaticKanbanStream = Stream<StaticKanban>;

    async fn receive_kanban(
        &self,
        _: Request<InitializeService>,
    ) -> Result<Response<Self::ReceiveKanbanStream>, Status> {
        Err(Status::unimplemented("trivial"))
    }
    async fn send_kanban(&self, _: Request<SendRequest>) -> Result<Response<SendResponse>, Status> {
        Ok(Response::new(SendResponse::default()))
    }
    async fn send_static_kanban(&self, _: Request<StaticRequest>) -> Result<Response<SendResponse>, Status> {
        Ok(Response::new(SendResponse::default()))
    }
    async fn receive_static_kanban(
        &self,
        _: Request<Topic>,
    ) -> Result<Response<Self::ReceiveStaticKanbanStream>, Status> {
        Err(Status::unimplemented("trivial"))
    }
    async fn delete_static_kanban(&self, _: Request<DeleteStaticRequest>) -> Result<Response<SendResponse>, Status> {
        Ok(Response::new(SendResponse::default()))
    }
}

fn main() -> std::process::ExitCode {
    let Some(addr) = std::env::args().nth(1).and_then(|a| a.parse::<std::net::SocketAddr>().ok()) else {
        eprintln!("usage: grpc-trivial HOST:PORT");
        return std::process::ExitCode::from(2);
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("grpc-trivial: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let served = rt.block_on(tonic::transport::Server::builder().add_service(KanbanServer::new(Trivial)).serve(addr));
    match served {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("grpc-trivial: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
