//! The transport half of opening a tunnel: TCP (optionally from a chosen local address), TLS
//! and the WebSocket upgrade with the Bearer token and the subprotocol offer.

use rpc_defs::{CloseCode, SUBPROTOCOL, SUBPROTOCOL_V2};
use tokio::{net::TcpStream, time::timeout};
use tokio_tungstenite::{
    Connector,
    tungstenite::{
        self,
        client::IntoClientRequest,
        http::{HeaderValue, header},
    },
};

use super::{GuestWs, config::GuestTunnelConfig, connect_error::ConnectError};
use crate::{link::Link, ws::TungsteniteWs};

/// `Sec-WebSocket-Protocol` offering both subprotocols, the push-key one first.
const OFFER_V2: &str = "tether.v2, tether.v1";

/// Dials the tunnel with `token` as Bearer and returns the upgraded link, once the server
/// selected a subprotocol this guest offered.
pub(super) async fn dial(
    config: &GuestTunnelConfig,
    token: &str,
) -> Result<Link<GuestWs>, ConnectError> {
    let request = upgrade_request(config, token)?;
    let connector = config.tls.clone().map(Connector::Rustls);
    let dial = async {
        match config.local_addr {
            None => {
                tokio_tungstenite::connect_async_tls_with_config(
                    request,
                    Some(config.websocket_config()),
                    true,
                    connector,
                )
                .await
            }
            Some(local) => {
                let stream = dial_from(local, request.uri())
                    .await
                    .map_err(tungstenite::Error::Io)?;
                tokio_tungstenite::client_async_tls_with_config(
                    request,
                    stream,
                    Some(config.websocket_config()),
                    connector,
                )
                .await
            }
        }
    };
    let (ws, response) = match timeout(config.connect_timeout, dial).await {
        Err(_) => return Err(ConnectError::ConnectTimeout),
        Ok(Err(tungstenite::Error::Http(resp))) => {
            return Err(ConnectError::Http {
                status: resp.status().as_u16(),
            });
        }
        Ok(Err(e)) => return Err(ConnectError::Connect(e.to_string())),
        Ok(Ok(pair)) => pair,
    };
    let selected = response
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .is_some_and(|p| {
            p.as_bytes() == SUBPROTOCOL.as_bytes()
                || (config.offer_push_key && p.as_bytes() == SUBPROTOCOL_V2.as_bytes())
        });
    let mut link = Link::new(TungsteniteWs(ws));
    if !selected {
        link.close(
            CloseCode::Protocol.code(),
            "subprotocol not selected",
            config.close_timeout,
        )
        .await;
        return Err(ConnectError::Subprotocol);
    }
    Ok(link)
}

/// The upgrade request: `token` as Bearer (kept out of logs), and the subprotocol offer.
fn upgrade_request(
    config: &GuestTunnelConfig,
    token: &str,
) -> Result<tungstenite::handshake::client::Request, ConnectError> {
    let mut request = config
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| ConnectError::Request(e.to_string()))?;
    let mut bearer = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| ConnectError::Request("token is not a valid header value".into()))?;
    bearer.set_sensitive(true);
    request.headers_mut().insert(header::AUTHORIZATION, bearer);
    let offered = if config.offer_push_key {
        OFFER_V2
    } else {
        SUBPROTOCOL
    };
    request.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(offered),
    );
    Ok(request)
}

/// A TCP connection to the URL's host from the local address `local`, Nagle off.
async fn dial_from(
    local: std::net::IpAddr,
    uri: &tungstenite::http::Uri,
) -> std::io::Result<TcpStream> {
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_owned());
    let host = uri.host().ok_or_else(|| invalid("URL without a host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("wss") {
            443
        } else {
            80
        });
    let mut last = invalid("host resolves to no address of the local address's family");
    for remote in tokio::net::lookup_host((host, port)).await? {
        if remote.is_ipv4() != local.is_ipv4() {
            continue;
        }
        let socket = if local.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.bind(std::net::SocketAddr::new(local, 0))?;
        match socket.connect(remote).await {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offer_names_both_subprotocols_push_key_first() {
        assert_eq!(OFFER_V2, format!("{SUBPROTOCOL_V2}, {SUBPROTOCOL}"));
    }

    #[test]
    fn the_upgrade_carries_the_token_as_a_sensitive_bearer_and_the_offer() {
        let config = GuestTunnelConfig::new("ws://127.0.0.1:8080/kbs/v0/tunnel");
        let request = upgrade_request(&config, "tok").unwrap();
        let auth = &request.headers()[header::AUTHORIZATION];
        assert_eq!(auth, "Bearer tok");
        assert!(auth.is_sensitive());
        assert_eq!(request.headers()[header::SEC_WEBSOCKET_PROTOCOL], OFFER_V2);

        let v1_only = GuestTunnelConfig {
            offer_push_key: false,
            ..config
        };
        let request = upgrade_request(&v1_only, "tok").unwrap();
        assert_eq!(
            request.headers()[header::SEC_WEBSOCKET_PROTOCOL],
            SUBPROTOCOL
        );
    }

    #[test]
    fn a_token_that_cannot_be_a_header_is_refused_before_dialing() {
        let config = GuestTunnelConfig::new("ws://127.0.0.1:8080/kbs/v0/tunnel");
        let err = upgrade_request(&config, "bad\ntoken").unwrap_err();
        assert!(matches!(err, ConnectError::Request(_)), "{err:?}");
        let bad_url = GuestTunnelConfig::new("not a url");
        assert!(matches!(
            upgrade_request(&bad_url, "tok"),
            Err(ConnectError::Request(_))
        ));
    }
}
