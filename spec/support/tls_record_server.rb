# frozen_string_literal: true

# An HTTPS server for the secrets specs, run inside the test internet's namespace
# (`ip netns exec NS ruby tls_record_server.rb CERT KEY STRANGER_CERT STRANGER_KEY`). It
# listens on port 443 of 203.0.113.10 (inet.test) and 203.0.113.11 (other.inet.test) with a
# certificate from the spec's own test CA, and on 203.0.113.10:8443 with one from a CA
# nobody trusts; reads one HTTP/1.1 request per connection (head ≤ 64 KiB, a
# Content-Length or chunked body ≤ 1 MiB) and prints it on stdout as one JSON line
# {"addr", "request" (base64)}, then answers 200 with the request's size. `GET /size/N`
# (for bench/secrets_tls.rb) answers N bytes instead and records nothing. Every connection
# is bounded in time (30 s); the process exits when its parent (the spec run) goes away.
require "base64"
require "json"
require "openssl"
require "socket"

parent = Process.ppid
$stdout.sync = true
LOCK = Mutex.new

def context(cert_path, key_path)
  ctx = OpenSSL::SSL::SSLContext.new
  ctx.cert = OpenSSL::X509::Certificate.new(File.read(cert_path))
  ctx.key = OpenSSL::PKey.read(File.read(key_path))
  ctx.min_version = OpenSSL::SSL::TLS1_2_VERSION
  ctx
end

def read_request(ssl)
  buf = +"".b
  deadline = Time.now + 30
  until (i = buf.index("\r\n\r\n"))
    raise "head too large" if buf.bytesize > 65_536
    raise "timeout" if Time.now > deadline

    buf << ssl.readpartial(16_384)
  end
  head = buf[0, i + 4]
  body = buf[(i + 4)..]
  if (cl = head[/^content-length:\s*(\d+)/i, 1])
    body << ssl.readpartial(16_384) while body.bytesize < cl.to_i && body.bytesize <= 1 << 20 && Time.now < deadline
  elsif head =~ /^transfer-encoding:\s*chunked/i
    body << ssl.readpartial(16_384) until body.include?("\r\n0\r\n") || body.start_with?("0\r\n") ||
                                          body.bytesize > 1 << 20 || Time.now > deadline
  end
  head + body
end

good = context(ARGV.fetch(0), ARGV.fetch(1))
stranger = context(ARGV.fetch(2), ARGV.fetch(3))
[["203.0.113.10", 443, good], ["203.0.113.11", 443, good], ["203.0.113.10", 8443, stranger]].each do |addr, port, ctx|
  server = OpenSSL::SSL::SSLServer.new(TCPServer.new(addr, port), ctx)
  server.start_immediately = false
  Thread.new do
    loop do
      client = server.accept
      Thread.new(client) do |c|
        c.sync_close = true
        c.to_io.setsockopt(Socket::SOL_SOCKET, Socket::SO_RCVTIMEO, [30, 0].pack("l_2"))
        c.accept
        request = read_request(c)
        if (size = request[%r{\AGET /size/(\d+) }, 1]&.to_i)
          # Benchmark downloads: `size` bytes (≤ 64 MiB), not recorded.
          size = [size, 64 << 20].min
          c.write("HTTP/1.1 200 OK\r\nContent-Length: #{size}\r\nConnection: close\r\n\r\n")
          chunk = "x" * 65_536
          (size / chunk.bytesize).times { c.write(chunk) }
          c.write(chunk[0, size % chunk.bytesize])
          next
        end
        LOCK.synchronize { puts JSON.generate("addr" => addr, "request" => Base64.strict_encode64(request)) }
        reply = "ok #{request.bytesize}\n"
        c.write("HTTP/1.1 200 OK\r\nContent-Length: #{reply.bytesize}\r\nConnection: close\r\n\r\n#{reply}")
      rescue StandardError
        nil
      ensure
        begin
          c.close
        rescue StandardError
          nil
        end
      end
    rescue StandardError
      nil
    end
  end
end

puts "ready"
loop do
  sleep 1
  exit 0 if Process.ppid != parent
end
