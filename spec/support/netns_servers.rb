# frozen_string_literal: true

# The test internet's services, run inside its network namespace by spec/support/netns.rb
# (`ip netns exec NS ruby netns_servers.rb BIG_FILE`):
#   HTTP  203.0.113.10:80   GET /hello → "hello from the test internet\n",
#                           GET /big → BIG_FILE (64 MiB), anything else 404
#   TCP   203.0.113.10:7    echo
#   UDP   203.0.113.10:7    echo
# and the same on [2001:db8:6d73::10] and [2001:db8:6d73::11].
# Every connection is bounded in time (30 s idle) and size (requests up to 8 KiB); the
# process exits when its parent (the spec run) goes away.
require "socket"

# IPv4 and the IPv6 documentation addresses the IPv6 specs use.
ADDRS = ["203.0.113.10", "2001:db8:6d73::10", "2001:db8:6d73::11"].freeze
BIG = ARGV.fetch(0)
parent = Process.ppid

def with_deadline(sock)
  yield
rescue IOError, SystemCallError
  nil
ensure
  sock.close unless sock.closed?
end

def read_request(sock)
  head = +""
  until head.include?("\r\n\r\n")
    return nil unless sock.wait_readable(30)

    chunk = sock.readpartial(1024)
    head << chunk
    return nil if head.bytesize > 8192
  end
  head.lines.first.to_s.split(" ")[1]
end

ADDRS.each do |addr|
  http = TCPServer.new(addr, 80)
  Thread.new do
    loop do
      client = http.accept
      Thread.new(client) do |c|
        with_deadline(c) do
          case read_request(c)
          when "/hello"
            body = "hello from the test internet\n"
            c.write("HTTP/1.1 200 OK\r\nContent-Length: #{body.bytesize}\r\nConnection: close\r\n\r\n#{body}")
          when "/big"
            size = File.size(BIG)
            c.write("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: #{size}\r\nConnection: close\r\n\r\n")
            File.open(BIG, "rb") { |f| IO.copy_stream(f, c) }
          else
            c.write("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
          end
        end
      end
    end
  end

  echo = TCPServer.new(addr, 7)
  Thread.new do
    loop do
      client = echo.accept
      Thread.new(client) do |c|
        with_deadline(c) do
          while c.wait_readable(30)
            c.write(c.readpartial(65_536))
          end
        end
      end
    end
  end

  udp = UDPSocket.new(addr.include?(":") ? Socket::AF_INET6 : Socket::AF_INET)
  udp.bind(addr, 7)
  Thread.new do
    loop do
      data, from = udp.recvfrom(65_535)
      udp.send(data, 0, from[3], from[1])
    rescue SystemCallError
      nil
    end
  end
end

$stdout.puts "ready"
$stdout.flush
# Exit with the spec run, even if it was killed before it could clean up.
sleep 1 while Process.ppid == parent
