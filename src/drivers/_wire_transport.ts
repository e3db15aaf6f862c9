/**
 * The wire driver's byte streams: TCP and Unix sockets on Deno's own sockets, read into one
 * reused buffer; TLS through `node:tls`, loaded only for a connection that asks for it (its
 * `sslmode=require` and `verify-ca` need checks Deno's own TLS cannot turn off, and
 * `node:net` alone takes about 20 ms to load).
 *
 * @module
 */

import type { Buffer } from "node:buffer";
import type { ResolvedSsl } from "../config.ts";

type BufferClass = typeof import("node:buffer").Buffer;

let loading: Promise<BufferClass> | undefined;
let loaded: BufferClass | undefined;

/**
 * `node:buffer`'s `Buffer`, whose UTF-8 decoder the rows are read with. Loading it takes
 * 12-16 ms, about a quarter of the library's import, so a transport loads it as it opens,
 * while the server starts the session, instead of every program at import.
 */
function loadBuffer(): Promise<BufferClass> {
  return loading ??= import("node:buffer").then((module) => loaded = module.Buffer);
}

/**
 * A `Buffer` of `size` bytes, not zeroed, for the bytes of a transport's data: the transport
 * that delivered them has loaded `node:buffer`.
 */
export function allocBuffer(size: number): Buffer {
  return loaded!.allocUnsafe(size);
}

/** Where a session connects. */
export interface Address {
  host: string;
  port: number;
  /** A Unix socket path, when `host` is a folder. */
  path?: string;
}

/** What a transport reports. */
export interface TransportEvents {
  /** Bytes from the server: a view valid only during the call. */
  data(chunk: Buffer): void;
  /** The stream ended, for whatever reason (once). */
  close(): void;
  /** Bytes given to {@link Transport.write} were sent: the transport no longer reads them. */
  written(bytes: Uint8Array): void;
}

/** A connected byte stream to the server. */
export interface Transport {
  /** Queues bytes; false once enough wait that the writer should await {@link drained}. */
  write(bytes: Uint8Array): boolean;
  /** Settles once everything queued was written (or the stream ended). */
  drained(): Promise<void>;
  /** Stops reading until {@link resume}. */
  pause(): void;
  resume(): void;
  /** Writes what is queued, then ends the stream. */
  end(): void;
  /** Ends the stream now. */
  destroy(): void;
}

/** Bytes read at most per read. */
const READ_SIZE = 64 * 1024;
/** Queued bytes above which `write()` asks the writer to wait. */
const HIGH_WATER = 256 * 1024;
/** TCP keepalive probes start after this much idle time. */
const KEEPALIVE_MS = 60_000;
/** An SSLRequest's answer that accepts TLS. */
const TLS_ACCEPTED = 0x53;

/**
 * Connects to `address`, with TLS after `sslRequest` when `ssl` is set. Rejects with the
 * socket's error, or when the server does not offer TLS. Aborting `signal` while TLS is being
 * set up closes the socket and rejects (a plain socket is handed over once connected, and its
 * owner closes it).
 */
export async function openTransport(
  address: Address,
  ssl: ResolvedSsl | undefined,
  sslRequest: Uint8Array,
  events: TransportEvents,
  signal: AbortSignal,
): Promise<Transport> {
  if (ssl !== undefined) return await openTls(address, ssl, sslRequest, events, signal);
  const conn = await connect(address);
  return new DenoTransport(conn, events);
}

async function connect(address: Address): Promise<Deno.Conn> {
  if (address.path !== undefined) {
    return await Deno.connect({ transport: "unix", path: address.path });
  }
  const conn = await Deno.connect({ hostname: address.host, port: address.port });
  conn.setNoDelay(true);
  conn.setKeepAlive(true);
  return conn;
}

/**
 * Sends a CancelRequest on a connection of its own, over plain TCP or the Unix socket as the
 * server expects it; settles once the server has read it and hung up (or it failed).
 */
export async function sendCancelRequest(address: Address, request: Uint8Array): Promise<void> {
  let conn: Deno.Conn | undefined;
  try {
    conn = await connect(address);
    let written = 0;
    while (written < request.length) written += await conn.write(request.subarray(written));
    // The server hangs up once it has passed the request on.
    while (await conn.read(new Uint8Array(16)) !== null) { /* nothing is sent */ }
  } catch {
    // Refused or reset: there is nothing more to do about a cancel.
  } finally {
    try {
      conn?.close();
    } catch {
      // Already closed.
    }
  }
}

/** A Deno TCP or Unix socket. */
class DenoTransport implements Transport {
  readonly #conn: Deno.Conn;
  readonly #events: TransportEvents;
  #queue: Uint8Array[] = [];
  #queued = 0;
  #writing = false;
  #ending = false;
  #closed = false;
  #paused = false;
  #resumed?: () => void;
  #drainWaiters: Array<() => void> = [];

  constructor(conn: Deno.Conn, events: TransportEvents) {
    this.#conn = conn;
    this.#events = events;
    this.#read();
  }

  async #read(): Promise<void> {
    const bytes = new Uint8Array(READ_SIZE);
    try {
      const view = (await loadBuffer()).from(bytes.buffer, 0, READ_SIZE);
      while (!this.#closed) {
        if (this.#paused) await new Promise<void>((resolve) => this.#resumed = resolve);
        const n = await this.#conn.read(bytes);
        if (n === null) break;
        this.#events.data(view.subarray(0, n));
      }
    } catch {
      // Reset, or closed by destroy(): the stream is over either way.
    }
    this.#close();
  }

  write(bytes: Uint8Array): boolean {
    if (this.#closed) return true;
    this.#queue.push(bytes);
    this.#queued += bytes.length;
    if (!this.#writing) this.#pump();
    return this.#queued < HIGH_WATER;
  }

  async #pump(): Promise<void> {
    this.#writing = true;
    try {
      while (this.#queue.length > 0 && !this.#closed) {
        const queue = this.#queue;
        this.#queue = [];
        const single = queue.length === 1;
        const chunk = single ? queue[0] : joined(queue);
        // Joined bytes were copied: theirs are free already, a single chunk's once written.
        if (!single) {
          for (const bytes of queue) this.#events.written(bytes);
        }
        let written = 0;
        while (written < chunk.length) written += await this.#conn.write(chunk.subarray(written));
        this.#queued -= chunk.length;
        if (single) this.#events.written(chunk);
      }
    } catch {
      this.destroy();
    } finally {
      this.#writing = false;
    }
    for (const wake of this.#drainWaiters.splice(0)) wake();
    if (this.#ending) this.destroy();
  }

  drained(): Promise<void> {
    if (!this.#writing || this.#closed) return Promise.resolve();
    return new Promise<void>((resolve) => this.#drainWaiters.push(resolve));
  }

  pause(): void {
    this.#paused = true;
  }

  resume(): void {
    this.#paused = false;
    const resumed = this.#resumed;
    this.#resumed = undefined;
    resumed?.();
  }

  end(): void {
    this.#ending = true;
    if (!this.#writing) this.destroy();
  }

  destroy(): void {
    if (this.#closed) return;
    try {
      this.#conn.close();
    } catch {
      // Already closed by the peer.
    }
    this.#close();
  }

  #close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.resume();
    for (const wake of this.#drainWaiters.splice(0)) wake();
    this.#events.close();
  }
}

function joined(chunks: readonly Uint8Array[]): Uint8Array {
  let length = 0;
  for (const chunk of chunks) length += chunk.length;
  const out = new Uint8Array(length);
  let at = 0;
  for (const chunk of chunks) {
    out.set(chunk, at);
    at += chunk.length;
  }
  return out;
}

/**
 * TLS options for one libpq-style mode. `verify-full` checks the certificate against the
 * configured host itself: the TLS layer skips the name check when the host is an IP
 * address (it sends no server name then), which would make verify-full verify-ca.
 */
function tlsOptions(
  ssl: ResolvedSsl,
  host: string,
  checkServerIdentity: (host: string, cert: never) => Error | undefined,
): Record<string, unknown> {
  const options: Record<string, unknown> = { rejectUnauthorized: ssl.mode !== "require" };
  if (ssl.ca !== undefined) options.ca = ssl.ca;
  if (ssl.cert !== undefined) options.cert = ssl.cert;
  if (ssl.key !== undefined) options.key = ssl.key;
  if (ssl.keyPassword !== undefined) options.passphrase = ssl.keyPassword;
  if (!/^[\d.:]+$/.test(host)) options.servername = host;
  options.checkServerIdentity = ssl.mode === "verify-full"
    ? (_name: string, cert: never) => checkServerIdentity(host, cert)
    : () => undefined;
  return options;
}

/** A `node:net` socket with TLS started on it after the SSLRequest. */
async function openTls(
  address: Address,
  ssl: ResolvedSsl,
  sslRequest: Uint8Array,
  events: TransportEvents,
  signal: AbortSignal,
): Promise<Transport> {
  const [{ Socket }, tls] = await Promise.all([
    import("node:net"),
    import("node:tls"),
    loadBuffer(),
  ]);
  const socket = new Socket();
  let secure: NodeSocket | undefined;
  // A server that stops answering mid-handshake: the deadline's abort closes the socket.
  const onAbort = () => {
    secure?.destroy();
    socket.destroy(signal.reason);
  };
  signal.addEventListener("abort", onAbort, { once: true });
  try {
    signal.throwIfAborted();
    await new Promise<void>((resolve, reject) => {
      socket.once("connect", resolve);
      socket.once("error", reject);
      if (address.path !== undefined) {
        socket.connect(address.path);
      } else {
        socket.setNoDelay(true);
        socket.setKeepAlive(true, KEEPALIVE_MS);
        socket.connect(address.port, address.host);
      }
    });
    socket.write(sslRequest);
    const answer = await new Promise<number>((resolve, reject) => {
      socket.once("data", (data: Uint8Array) => resolve(data[0]));
      socket.once("error", reject);
      socket.once(
        "close",
        () => reject(signal.reason ?? new Error("the server closed the connection")),
      );
    });
    if (answer !== TLS_ACCEPTED) {
      throw new Error("the server does not offer TLS: it answered the SSLRequest with no");
    }
    const options = tlsOptions(ssl, address.host, tls.checkServerIdentity as never);
    const connecting = tls.connect({ socket, ...options } as never);
    secure = connecting as unknown as NodeSocket;
    await new Promise<void>((resolve, reject) => {
      connecting.once("secureConnect", resolve);
      connecting.once("error", reject);
      connecting.once(
        "close",
        () => reject(signal.reason ?? new Error("the server closed the connection")),
      );
    });
    signal.throwIfAborted();
    return new NodeTransport(
      connecting as unknown as NodeSocket,
      socket as unknown as NodeSocket,
      events,
    );
  } catch (error) {
    secure?.destroy();
    socket.destroy();
    throw error;
  } finally {
    signal.removeEventListener("abort", onAbort);
  }
}

/** The part of a `node:net` or `node:tls` socket a transport uses. */
interface NodeSocket {
  on(event: "readable" | "error", listener: () => void): unknown;
  once(event: "close" | "drain" | "end", listener: () => void): unknown;
  off(event: "close" | "drain", listener: () => void): unknown;
  read(): Buffer | null;
  pause(): unknown;
  resume(): unknown;
  write(bytes: Uint8Array, done: (error?: Error | null) => void): boolean;
  end(): unknown;
  destroy(error?: unknown): unknown;
  readonly writableNeedDrain: boolean;
}

/**
 * A `node:tls` socket, read in pull mode. Pausing it pauses the TCP socket under it: Deno's
 * TLS socket stops on its own `pause()` only the first time, and after one `resume()` it
 * reads on, so a slow COPY-out reader's rows would pile up in memory instead of holding the
 * server back.
 */
class NodeTransport implements Transport {
  readonly #socket: NodeSocket;
  /** The TCP socket under TLS. */
  readonly #raw: NodeSocket;
  readonly #events: TransportEvents;
  #closed = false;
  #paused = false;

  constructor(socket: NodeSocket, raw: NodeSocket, events: TransportEvents) {
    this.#socket = socket;
    this.#raw = raw;
    this.#events = events;
    socket.on("readable", () => this.#read());
    socket.on("error", () => {});
    socket.once("close", () => this.#close());
    this.#read();
  }

  #read(): void {
    while (!this.#paused && !this.#closed) {
      const chunk = this.#socket.read();
      if (chunk === null) return;
      this.#events.data(chunk);
    }
  }

  write(bytes: Uint8Array): boolean {
    if (this.#closed) return true;
    return this.#socket.write(bytes, (error) => {
      if (!error) this.#events.written(bytes);
    });
  }

  drained(): Promise<void> {
    if (this.#closed || !this.#socket.writableNeedDrain) return Promise.resolve();
    return new Promise<void>((resolve) => {
      const done = () => {
        this.#socket.off("drain", done);
        this.#socket.off("close", done);
        resolve();
      };
      this.#socket.once("drain", done);
      this.#socket.once("close", done);
    });
  }

  pause(): void {
    this.#paused = true;
    this.#raw.pause();
  }

  resume(): void {
    if (!this.#paused) return;
    this.#paused = false;
    this.#raw.resume();
    this.#read();
  }

  end(): void {
    this.#socket.end();
  }

  /** Ends the socket, and the transport with it at once: nothing more is written. */
  destroy(): void {
    this.#socket.destroy();
    this.#close();
  }

  #close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#events.close();
  }
}
